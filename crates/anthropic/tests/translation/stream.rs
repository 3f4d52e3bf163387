//! Streamed chunks → Anthropic events, compared as exact sequences.

use proxypal_anthropic::{ErrorKind, StopReason, StreamTranslator, TranslateError, error_event};
use serde_json::{Value, json};

/// The events in `bytes`, one line each: `start 1 tool_use call_1 weather`,
/// `delta 0 text "Hi"`, `delta 1 json "{\"a\""`, `stop 1`,
/// `message_delta tool_use seq=null in=- out=12`, … Checks the framing on the way.
fn events(bytes: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.is_empty() || text.ends_with("\n\n"), "events end with a blank line: {text:?}");
    let mut out = Vec::new();
    for event in text.split_terminator("\n\n") {
        let (name, data) = event.split_once('\n').unwrap();
        let name = name.strip_prefix("event: ").unwrap();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], name, "event name and data type agree");
        out.push(match name {
            "message_start" => {
                let m = &data["message"];
                format!(
                    "message_start {} {} in={}",
                    m["id"].as_str().unwrap(),
                    m["model"].as_str().unwrap(),
                    m["usage"]["input_tokens"]
                )
            }
            "content_block_start" => {
                let b = &data["content_block"];
                match b["type"].as_str().unwrap() {
                    "text" => format!("start {} text", data["index"]),
                    "tool_use" => {
                        assert_eq!(b["input"], json!({}));
                        format!(
                            "start {} tool_use {} {}",
                            data["index"],
                            b["id"].as_str().unwrap(),
                            b["name"].as_str().unwrap()
                        )
                    }
                    other => panic!("block type {other}"),
                }
            }
            "content_block_delta" => {
                let d = &data["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => format!("delta {} text {}", data["index"], d["text"]),
                    "input_json_delta" => format!("delta {} json {}", data["index"], d["partial_json"]),
                    other => panic!("delta type {other}"),
                }
            }
            "content_block_stop" => format!("stop {}", data["index"]),
            "message_delta" => {
                let input = data["usage"].get("input_tokens").map_or("-".to_owned(), Value::to_string);
                format!(
                    "message_delta {} seq={} in={input} out={}",
                    data["delta"]["stop_reason"].as_str().unwrap(),
                    data["delta"]["stop_sequence"],
                    data["usage"]["output_tokens"]
                )
            }
            "error" => {
                format!("error {} {}", data["error"]["type"].as_str().unwrap(), data["error"]["message"])
            }
            other => other.to_owned(),
        });
    }
    out
}

/// Feeds `chunks` (JSON values, or raw strings for `[DONE]` and garbage),
/// collecting every output.
fn run(translator: &mut StreamTranslator, chunks: &[Value]) -> Vec<String> {
    let mut bytes = Vec::new();
    for chunk in chunks {
        let data = match chunk {
            Value::String(raw) => raw.clone(),
            chunk => chunk.to_string(),
        };
        translator.push_into(data.as_bytes(), &mut bytes).unwrap_or_else(|e| panic!("{data}: {e}"));
    }
    events(&bytes)
}

fn delta(delta: Value) -> Value {
    json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
}

fn finish(reason: &str) -> Value {
    json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn call(index: u64, id: Option<&str>, name: Option<&str>, args: &str) -> Value {
    let mut function = json!({"arguments": args});
    if let Some(name) = name {
        function["name"] = json!(name);
    }
    let mut call = json!({"index": index, "function": function});
    if let Some(id) = id {
        call["id"] = json!(id);
        call["type"] = json!("function");
    }
    delta(json!({"tool_calls": [call]}))
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"id": "chatcmpl-s1", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})
}

fn done() -> Value {
    json!("[DONE]")
}

fn lines(expected: &[&str]) -> Vec<String> {
    expected.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn a_text_stream() {
    let mut t = StreamTranslator::new("claude-haiku-4-5").with_input_tokens(21);
    let got = run(
        &mut t,
        &[
            delta(json!({"role": "assistant", "content": ""})),
            delta(json!({"content": "Hel"})),
            delta(json!({"content": "lo"})),
            delta(json!({"content": null})),
            finish("stop"),
            done(),
        ],
    );
    assert_eq!(
        got,
        lines(&[
            "message_start msg_s1 claude-haiku-4-5 in=21",
            "ping",
            "start 0 text",
            r#"delta 0 text "Hel""#,
            r#"delta 0 text "lo""#,
            "stop 0",
            // No upstream usage: the estimate, a token per 4 bytes of "Hello".
            "message_delta end_turn seq=null in=- out=2",
            "message_stop",
        ])
    );
    assert!(t.is_finished());
    assert_eq!(t.finish_reason(), Some("stop"));
}

#[test]
fn the_exact_bytes() {
    let mut t = StreamTranslator::new("claude-haiku-4-5");
    let mut out = t.push(delta(json!({"content": "Hi"})).to_string().as_bytes()).unwrap().to_vec();
    out.extend_from_slice(&t.push(finish("stop").to_string().as_bytes()).unwrap());
    out.extend_from_slice(&t.push(usage(9, 1).to_string().as_bytes()).unwrap());
    out.extend_from_slice(&t.finish());
    let want = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"type":"message","id":"msg_s1","role":"assistant","model":"claude-haiku-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"output_tokens":0}}}"#,
        "\n\nevent: ping\n",
        r#"data: {"type":"ping"}"#,
        "\n\nevent: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
        "\n\nevent: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\nevent: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":9,"output_tokens":1}}"#,
        "\n\nevent: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n"
    );
    assert_eq!(std::str::from_utf8(&out).unwrap(), want);
}

#[test]
fn two_parallel_tool_calls_split_and_interleaved() {
    let mut t = StreamTranslator::new("claude-sonnet-4-5");
    let got = run(
        &mut t,
        &[
            delta(json!({"role": "assistant"})),
            call(0, Some("call_a"), Some("weather"), ""),
            call(0, None, None, "{\"ci"),
            call(1, Some("call_b"), Some("weather"), ""),
            call(1, None, None, "{\"city\":"),
            call(0, None, None, "ty\": \"Pa"),
            call(1, None, None, " \"Rome\"}"),
            call(0, None, None, "ris\"}"),
            finish("tool_calls"),
            usage(80, 30),
            done(),
        ],
    );
    assert_eq!(
        got,
        lines(&[
            "message_start msg_s1 claude-sonnet-4-5 in=0",
            "ping",
            "start 0 tool_use call_a weather",
            r#"delta 0 json "{\"ci""#,
            // call_b waits (buffered) until call_a's arguments are complete.
            r#"delta 0 json "ty\": \"Pa""#,
            r#"delta 0 json "ris\"}""#,
            "stop 0",
            "start 1 tool_use call_b weather",
            r#"delta 1 json "{\"city\": \"Rome\"}""#,
            "stop 1",
            "message_delta tool_use seq=null in=80 out=30",
            "message_stop",
        ])
    );
}

#[test]
fn parallel_tool_calls_one_after_the_other_stream_at_once() {
    let mut t = StreamTranslator::new("m");
    let mut out = Vec::new();
    for chunk in [
        call(0, Some("call_a"), Some("read"), ""),
        call(0, None, None, "{\"path\":"),
        call(0, None, None, "\"a.rs\"}"),
        call(1, Some("call_b"), Some("read"), "{\"path\":"),
    ] {
        t.push_into(chunk.to_string().as_bytes(), &mut out).unwrap();
    }
    // Before the end: call_a has stopped and call_b is streaming.
    assert_eq!(
        events(&out)[2..],
        lines(&[
            "start 0 tool_use call_a read",
            r#"delta 0 json "{\"path\":""#,
            r#"delta 0 json "\"a.rs\"}""#,
            "stop 0",
            "start 1 tool_use call_b read",
            r#"delta 1 json "{\"path\":""#,
        ])[..]
    );
}

#[test]
fn text_followed_by_a_tool_call() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            delta(json!({"content": "Let me look."})),
            call(0, Some("call_x"), Some("ls"), ""),
            call(0, None, None, "{}"),
            finish("tool_calls"),
            done(),
        ],
    );
    assert_eq!(
        got,
        lines(&[
            "message_start msg_s1 m in=0",
            "ping",
            "start 0 text",
            r#"delta 0 text "Let me look.""#,
            "stop 0",
            "start 1 tool_use call_x ls",
            r#"delta 1 json "{}""#,
            "stop 1",
            "message_delta tool_use seq=null in=- out=4",
            "message_stop",
        ])
    );
}

#[test]
fn text_during_an_unfinished_call_waits_for_it() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            call(0, Some("c0"), Some("f"), "{\"a\":"),
            delta(json!({"content": "and "})),
            delta(json!({"content": "then"})),
            call(0, None, None, "1}"),
            finish("stop"),
        ],
    );
    assert_eq!(
        got[2..],
        lines(&[
            "start 0 tool_use c0 f",
            r#"delta 0 json "{\"a\":""#,
            r#"delta 0 json "1}""#,
            "stop 0",
            "start 1 text",
            r#"delta 1 text "and then""#,
        ])[..]
    );
    // A stream that said "stop" but called a tool ends as tool_use.
    assert_eq!(t.stop_reason(), StopReason::ToolUse);
    // The estimate: 15 bytes of arguments and text, 4 tokens.
    assert_eq!(events(&t.finish())[1], "message_delta tool_use seq=null in=- out=4");
}

#[test]
fn whitespace_alone_opens_no_block() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            delta(json!({"content": "\n\n"})),
            call(0, Some("c0"), Some("ls"), "{}"),
            delta(json!({"content": "\n"})),
            delta(json!({"content": "Done."})),
            delta(json!({"content": "\n"})),
            delta(json!({"content": "Bye."})),
            finish("stop"),
            done(),
        ],
    );
    assert_eq!(
        got[2..],
        lines(&[
            "start 0 tool_use c0 ls",
            r#"delta 0 json "{}""#,
            "stop 0",
            "start 1 text",
            // The held whitespace goes before the text that follows it.
            r#"delta 1 text "\n\n\nDone.""#,
            r#"delta 1 text "\n""#,
            r#"delta 1 text "Bye.""#,
            "stop 1",
            "message_delta tool_use seq=null in=- out=4",
            "message_stop",
        ])[..]
    );
}

#[test]
fn usage_only_final_chunk_and_finish_without_done() {
    let mut t = StreamTranslator::new("m").with_input_tokens(5);
    let got = run(&mut t, &[delta(json!({"content": "ok"})), finish("length"), usage(1234, 77)]);
    assert_eq!(got, lines(&["message_start msg_s1 m in=5", "ping", "start 0 text", r#"delta 0 text "ok""#]));
    // The upstream ended without `[DONE]`: finish() ends the message.
    assert_eq!(
        events(&t.finish()),
        lines(&["stop 0", "message_delta max_tokens seq=null in=1234 out=77", "message_stop"])
    );
    assert!(t.finish().is_empty(), "finish is idempotent");
    assert!(t.push(delta(json!({"content": "late"})).to_string().as_bytes()).unwrap().is_empty());
    assert_eq!((t.usage().input_tokens, t.usage().output_tokens), (1234, 77));
}

#[test]
fn usage_in_the_first_chunk_goes_in_message_start() {
    let mut t = StreamTranslator::new("m").with_input_tokens(5);
    let first = json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"content": "a"}}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 1}});
    assert_eq!(run(&mut t, &[first])[0], "message_start msg_s1 m in=300");
}

#[test]
fn stop_sequence_reported_by_vllm() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            delta(json!({"content": "1 2 3"})),
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "4"}]}),
            done(),
        ],
    );
    assert_eq!(got[got.len() - 2], r#"message_delta stop_sequence seq="4" in=- out=2"#);
}

#[test]
fn an_empty_stream_is_still_a_message() {
    let mut t = StreamTranslator::new("m");
    let mut got = events(&t.finish());
    // No upstream id: a unique one of ProxyPal's.
    assert!(got[0].starts_with("message_start msg_proxypal") && got[0].ends_with(" m in=0"), "{}", got[0]);
    got[0] = "message_start msg_proxypal m in=0".to_owned();
    assert_eq!(
        got,
        lines(&[
            "message_start msg_proxypal m in=0",
            "ping",
            "message_delta end_turn seq=null in=- out=0",
            "message_stop"
        ])
    );
}

#[test]
fn garbage_is_an_error_not_a_panic_and_changes_nothing() {
    let mut t = StreamTranslator::new("m");
    let mut out = Vec::new();
    let garbage: [&[u8]; 6] = [
        b"{not json",
        b"\xff\xfe",
        b"42",
        br#"{"choices":{}}"#,
        br#"{"choices":[{"delta":{"tool_calls":[{"index":"x"}]}}]}"#,
        b"[DONE",
    ];
    for data in garbage {
        let error = t.push_into(data, &mut out).unwrap_err();
        assert!(matches!(error, TranslateError::InvalidChunk { .. }), "{error}");
        assert!(out.is_empty(), "nothing sent for {data:?}");
    }
    let error = t.push(br#"{"error":{"message":"Worker crashed","type":"server_error"}}"#).unwrap_err();
    assert_eq!(error, TranslateError::Upstream { kind: ErrorKind::Api, message: "Worker crashed".into() });
    // The stream carries on as if they had not come, and can end with an error event.
    let got = run(&mut t, &[delta(json!({"content": "x"}))]);
    assert_eq!(got[0], "message_start msg_s1 m in=0");
    assert_eq!(
        events(&error_event(ErrorKind::Overloaded, "upstream failed mid-stream")),
        lines(&[r#"error overloaded_error "upstream failed mid-stream""#])
    );
}

#[test]
fn odd_chunks_send_nothing() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            json!(""),
            json!("   "),
            json!({"id": "chatcmpl-s1", "choices": []}),
            json!({"id": "chatcmpl-s1", "choices": null}),
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": null}]}),
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0}]}),
            json!({"id": "chatcmpl-s1", "choices": [{"index": 1, "delta": {"content": "other choice"}}]}),
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"tool_calls": null, "content": null}}]}),
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"tool_calls": []}}]}),
            json!("data: [DONE]"),
        ],
    );
    assert_eq!(
        got,
        lines(&[
            "message_start msg_s1 m in=0",
            "ping",
            "message_delta end_turn seq=null in=- out=0",
            "message_stop"
        ])
    );
}

#[test]
fn tool_call_index_jumps_and_missing_pieces() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            // An index that jumps, no id: one is made.
            call(5, None, Some("first"), "{}"),
            // A call whose name comes later holds back nothing already open.
            call(7, Some("call_late"), None, "{\"q\":"),
            call(7, None, Some("search"), "1}"),
            // Arguments for a call whose block has stopped cannot be sent.
            call(5, None, None, "  "),
            call(5, None, None, "x"),
            // A piece without an index belongs to the last call.
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": " "}}]}}]}),
            // Arguments sent whole, as an object.
            json!({"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 9, "id": "call_obj", "function": {"name": "obj", "arguments": {"k": true}}}
            ]}}]}),
            // A name that never arrives.
            call(11, Some("call_anon"), None, "{}"),
            finish("tool_calls"),
            done(),
        ],
    );
    assert_eq!(
        got[2..],
        lines(&[
            "start 0 tool_use toolu_s1_0 first",
            r#"delta 0 json "{}""#,
            "stop 0",
            "start 1 tool_use call_late search",
            r#"delta 1 json "{\"q\":1}""#,
            r#"delta 1 json " ""#,
            "stop 1",
            "start 2 tool_use call_obj obj",
            r#"delta 2 json "{\"k\":true}""#,
            "stop 2",
            "start 3 tool_use call_anon ",
            r#"delta 3 json "{}""#,
            "stop 3",
            // 22 bytes sent (late fragments not counted): 6 tokens.
            "message_delta tool_use seq=null in=- out=6",
            "message_stop",
        ])[..]
    );
    assert_eq!(t.late_fragments(), 2);
}

#[test]
fn a_server_that_reuses_index_0_for_every_call() {
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            call(0, Some("call_1"), Some("a"), "{\"x\":1}"),
            call(0, Some("call_2"), Some("b"), "{\"y\":2}"),
            finish("tool_calls"),
        ],
    );
    assert_eq!(
        got[2..],
        lines(&[
            "start 0 tool_use call_1 a",
            r#"delta 0 json "{\"x\":1}""#,
            "stop 0",
            "start 1 tool_use call_2 b",
            r#"delta 1 json "{\"y\":2}""#,
        ])[..]
    );
}

#[test]
fn calls_with_neither_index_nor_id_are_told_apart_by_a_new_name_after_whole_arguments() {
    let piece = |name: Option<&str>, args: &str| {
        let mut function = json!({"arguments": args});
        if let Some(name) = name {
            function["name"] = json!(name);
        }
        delta(json!({"tool_calls": [{"function": function}]}))
    };
    let mut t = StreamTranslator::new("m");
    let got = run(
        &mut t,
        &[
            piece(Some("a"), "{\"x\":"),
            // The name again before the arguments are whole: the same call.
            piece(Some("a"), "1}"),
            // A name after whole arguments: the next call.
            piece(Some("b"), "{}"),
            finish("tool_calls"),
        ],
    );
    assert_eq!(
        got[2..7],
        lines(&[
            "start 0 tool_use toolu_s1_0 a",
            r#"delta 0 json "{\"x\":""#,
            r#"delta 0 json "1}""#,
            "stop 0",
            "start 1 tool_use toolu_s1_1 b",
        ])[..]
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Splits `s` at the given fractions (char boundaries).
    fn split(s: &str, cuts: &[usize]) -> Vec<String> {
        let mut points: Vec<usize> =
            cuts.iter().map(|c| c % (s.len() + 1)).filter(|&p| s.is_char_boundary(p)).collect();
        points.push(0);
        points.push(s.len());
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| s[w[0]..w[1]].to_owned()).collect()
    }

    proptest! {
        /// However two calls' arguments are cut and interleaved, each block's
        /// `partial_json` concatenates back to its arguments, indexes are 0 and
        /// 1, and blocks never overlap.
        #[test]
        fn interleaved_arguments_reassemble(
            a in r#"\{"[a-z]{1,6}": "[a-z {}\[\]]{0,12}"\}"#,
            b in r#"\{"[a-z]{1,6}": \[[0-9, ]{0,10}\]\}"#,
            cuts_a in proptest::collection::vec(any::<usize>(), 0..6),
            cuts_b in proptest::collection::vec(any::<usize>(), 0..6),
            order in proptest::collection::vec(any::<bool>(), 0..16),
        ) {
            let mut t = StreamTranslator::new("m");
            let mut chunks = vec![call(0, Some("A"), Some("fa"), ""), call(1, Some("B"), Some("fb"), "")];
            let (mut pa, mut pb) = (split(&a, &cuts_a).into_iter(), split(&b, &cuts_b).into_iter());
            let mut order = order.into_iter();
            loop {
                let take_a = order.next().unwrap_or(true);
                let next = if take_a { pa.next().map(|f| (0, f)).or_else(|| pb.next().map(|f| (1, f))) }
                    else { pb.next().map(|f| (1, f)).or_else(|| pa.next().map(|f| (0, f))) };
                let Some((k, fragment)) = next else { break };
                chunks.push(call(k, None, None, &fragment));
            }
            chunks.push(finish("tool_calls"));
            let mut out = Vec::new();
            for chunk in &chunks {
                t.push_into(chunk.to_string().as_bytes(), &mut out).unwrap();
            }
            t.push_into(b"[DONE]", &mut out).unwrap();
            let text = std::str::from_utf8(&out).unwrap();
            let mut args = [String::new(), String::new()];
            let mut open: Option<u64> = None;
            for event in text.split_terminator("\n\n") {
                let data: Value = serde_json::from_str(event.split_once("\ndata: ").unwrap().1).unwrap();
                match data["type"].as_str().unwrap() {
                    "content_block_start" => { prop_assert!(open.is_none()); open = data["index"].as_u64(); }
                    "content_block_stop" => { prop_assert_eq!(open, data["index"].as_u64()); open = None; }
                    "content_block_delta" => {
                        prop_assert_eq!(open, data["index"].as_u64());
                        let i = usize::try_from(data["index"].as_u64().unwrap()).unwrap();
                        args[i].push_str(data["delta"]["partial_json"].as_str().unwrap());
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(&args[0], &a);
            prop_assert_eq!(&args[1], &b);
            prop_assert_eq!(t.late_fragments(), 0);
        }

        /// Arbitrary bytes never panic; the translator always ends cleanly.
        #[test]
        fn arbitrary_payloads_never_panic(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut t = StreamTranslator::new("m");
            for p in &payloads {
                let _ = t.push(p);
            }
            let end = t.finish();
            let stop: &[u8] = b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
            prop_assert!(end.ends_with(stop), "ends with message_stop");
        }
    }
}
