//! What OpenAI-compatible upstreams send back, read leniently: every field
//! optional, unknown fields ignored, `null` the same as absent.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{ErrorKind, TranslateError, error_fields};
use crate::response::StopReason;

/// A chat completion or one streamed chunk of one.
#[derive(Debug, Deserialize)]
pub(crate) struct Completion {
    pub id: Option<String>,
    pub choices: Option<Vec<Choice>>,
    pub usage: Option<UsageIn>,
    pub error: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Choice {
    pub index: Option<u64>,
    /// A complete answer's message.
    pub message: Option<Delta>,
    /// A chunk's piece of it.
    pub delta: Option<Delta>,
    pub finish_reason: Option<String>,
    /// vLLM (NVIDIA NIM): the stop string that matched, or a token id.
    pub stop_reason: Option<Value>,
    /// SGLang's name for the same.
    pub matched_stop: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Delta {
    /// A string (or, from a few servers, a list of text parts).
    pub content: Option<Value>,
    pub refusal: Option<String>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// The legacy single function call.
    pub function_call: Option<FunctionIn>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ToolCallIn {
    pub index: Option<u64>,
    pub id: Option<String>,
    pub function: Option<FunctionIn>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct FunctionIn {
    pub name: Option<String>,
    /// A JSON string (or a fragment of one); an object from a few servers.
    pub arguments: Option<Value>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct UsageIn {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

impl Completion {
    /// An error object sent where an answer was expected.
    pub fn upstream_error(&self) -> Option<TranslateError> {
        let error = self.error.as_ref().filter(|e| !e.is_null())?;
        let mut wrapped = Map::new();
        wrapped.insert("error".to_owned(), error.clone());
        let (message, name) = error_fields(&Value::Object(wrapped));
        let kind = name.as_deref().and_then(ErrorKind::from_name).unwrap_or(ErrorKind::Api);
        Some(TranslateError::Upstream { kind, message: message.unwrap_or_else(|| error.to_string()) })
    }

    /// The first choice (index 0, or the first listed when none says).
    pub fn first_choice(&self) -> Option<&Choice> {
        let choices = self.choices.as_deref()?;
        choices.iter().find(|c| c.index.unwrap_or(0) == 0)
    }
}

impl Choice {
    /// The stop string a vLLM or SGLang server says matched.
    pub fn matched_stop(&self) -> Option<&str> {
        [&self.stop_reason, &self.matched_stop]
            .into_iter()
            .find_map(|v| v.as_ref().and_then(Value::as_str).filter(|s| !s.is_empty()))
    }
}

/// The text of a `content` value: a string, or the text parts of a list.
pub(crate) fn content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for part in parts {
                if let Some(text) = part.get("text").and_then(Value::as_str) {
                    out.push_str(text);
                }
            }
        }
        _ => {}
    }
}

/// `stop_reason` for an upstream `finish_reason`:
///
/// | `finish_reason` | `stop_reason` |
/// |---|---|
/// | `stop`, with a matched stop string reported | `stop_sequence` |
/// | `stop`, `eos`, absent, anything unknown | `end_turn` |
/// | `length` | `max_tokens` |
/// | `tool_calls`, `function_call` | `tool_use` |
/// | `content_filter` | `refusal` |
///
/// and `tool_use` whenever the answer holds tool calls but the upstream said
/// `stop` or nothing (several servers do).
pub(crate) fn stop_reason(finish: Option<&str>, matched: Option<&str>, has_tool_calls: bool) -> StopReason {
    match finish {
        Some("length") => StopReason::MaxTokens,
        Some("tool_calls") | Some("function_call") => StopReason::ToolUse,
        Some("content_filter") => StopReason::Refusal,
        _ if has_tool_calls => StopReason::ToolUse,
        Some("stop") if matched.is_some() => StopReason::StopSequence,
        _ => StopReason::EndTurn,
    }
}

/// An Anthropic-style message id from the upstream's: `msg_` and its
/// letters, digits, `-` and `_` (without OpenAI's `chatcmpl-`), or
/// `msg_proxypal<unique hex>` when it has none (unique in this process and,
/// through the start time in it, across restarts: clients such as Claude
/// Code track tool results by ids derived from it).
pub(crate) fn message_id(upstream: Option<&str>) -> String {
    let raw = upstream.unwrap_or("");
    let raw = raw.strip_prefix("chatcmpl-").unwrap_or(raw);
    let mut id = String::with_capacity(raw.len() + 4);
    id.push_str("msg_");
    id.extend(raw.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_'));
    if id.len() == 4 {
        id.push_str(&format!("proxypal{:x}", unique()));
    }
    id
}

/// A number no earlier call in this process returned, starting from the
/// process's first use in nanoseconds since the epoch.
fn unique() -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    });
    base.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The id for a tool call the upstream sent without one.
pub(crate) fn tool_use_id(message_id: &str, n: usize) -> String {
    format!("toolu_{}_{n}", message_id.strip_prefix("msg_").unwrap_or(message_id))
}

/// A complete tool call's `input` from its arguments: the parsed object;
/// the inner object when the model double-encoded it as a JSON string; `{}`
/// for none or blank; otherwise `{"_raw": <the arguments as sent>}`, so a
/// model's bad JSON reaches the client instead of failing the answer.
pub(crate) fn parse_arguments(arguments: Option<&Value>) -> Value {
    let text = match arguments {
        None | Some(Value::Null) => return Value::Object(Map::new()),
        Some(Value::Object(o)) => return Value::Object(o.clone()),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return raw(other.to_string()),
    };
    if text.trim().is_empty() {
        return Value::Object(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Value::Object(o),
        Ok(Value::String(inner)) => match serde_json::from_str::<Value>(&inner) {
            Ok(Value::Object(o)) => Value::Object(o),
            _ => raw(text.to_owned()),
        },
        _ => raw(text.to_owned()),
    }
}

fn raw(text: String) -> Value {
    let mut o = Map::new();
    o.insert("_raw".to_owned(), Value::String(text));
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_parse_best_effort() {
        let table = [
            (None, json!({})),
            (Some(json!(null)), json!({})),
            (Some(json!("")), json!({})),
            (Some(json!("  ")), json!({})),
            (Some(json!(r#"{"path":"a.rs"}"#)), json!({"path": "a.rs"})),
            (Some(json!({"path": "a.rs"})), json!({"path": "a.rs"})),
            (Some(json!(r#""{\"path\":\"a.rs\"}""#)), json!({"path": "a.rs"})),
            (Some(json!(r#"{"path":"a.rs""#)), json!({"_raw": r#"{"path":"a.rs""#})),
            (Some(json!("[1,2]")), json!({"_raw": "[1,2]"})),
            (Some(json!(42)), json!({"_raw": "42"})),
        ];
        for (input, want) in table {
            assert_eq!(parse_arguments(input.as_ref()), want, "{input:?}");
        }
    }

    #[test]
    fn ids() {
        assert_eq!(message_id(Some("chatcmpl-abc123")), "msg_abc123");
        assert_eq!(message_id(Some("cmpl/9 x")), "msg_cmpl9x");
        let (a, b) = (message_id(None), message_id(Some("chatcmpl-")));
        assert!(a.starts_with("msg_proxypal") && b.starts_with("msg_proxypal"), "{a} {b}");
        assert_ne!(a, b, "no two answers without an upstream id share one");
        assert_eq!(tool_use_id("msg_abc", 1), "toolu_abc_1");
    }
}
