//! What a chat completion answers: the text (greeting, tool result, image
//! mention, stop-sequence cut) or the tool calls, and how a stream splits
//! them. Pure functions over the parsed request; the exact rules are in the
//! crate documentation ("Chat completion answers").

use serde_json::{Map, Value};

/// Tokens a `prompt_tokens` count charges per image part, instead of the
/// bytes of its URL.
pub(crate) const IMAGE_TOKENS: u64 = 85;

/// Number of pieces a tool call's arguments string is streamed in (empty
/// pieces are skipped).
const ARGUMENT_PIECES: usize = 3;

/// One tool call of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ToolCall {
    /// `call_<response number>_<index>`.
    pub(crate) id: String,
    /// The function's name.
    pub(crate) name: String,
    /// The arguments, compact JSON.
    pub(crate) arguments: String,
}

/// What the request asks the simulator to answer.
#[derive(Debug)]
pub(crate) struct Plan {
    kind: Kind,
    /// Stop strings (empty ones dropped), in request order.
    pub(crate) stops: Vec<String>,
    /// Image parts in all messages.
    pub(crate) images: usize,
    /// Bytes of their URLs.
    image_url_bytes: usize,
}

#[derive(Debug)]
enum Kind {
    /// The greeting naming the key.
    Greeting,
    /// `Tool result: <content>`.
    ToolResult(String),
    /// Tool calls of these functions (one or two names).
    ToolCalls(Vec<Tool>),
}

/// A function tool of the request.
#[derive(Clone, Debug)]
struct Tool {
    name: String,
    parameters: Option<Value>,
}

/// The answer of a chat completion, before it is shaped as a plain or a
/// streamed response.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Assistant text, before any stop cut.
    Text(String),
    /// Tool calls, in order.
    ToolCalls(Vec<ToolCall>),
}

impl Plan {
    /// Reads what matters in a chat request. `Err` is a 400 detail.
    pub(crate) fn from_request(req: &Map<String, Value>) -> Result<Self, String> {
        let messages = req.get("messages").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        let stops = stops(req.get("stop"))?;
        let tools = tools(req.get("tools"))?;
        let (images, image_url_bytes) = images(messages);
        let last = messages.last();
        let role = last.and_then(|m| m.get("role")).and_then(Value::as_str);
        let kind = match role {
            Some("tool") => {
                let mut text = String::new();
                if let Some(content) = last.and_then(|m| m.get("content")) {
                    content_text(content, &mut text);
                }
                Kind::ToolResult(text)
            }
            Some("user") if !tools.is_empty() => match req.get("tool_choice") {
                Some(Value::String(s)) if s == "none" => Kind::Greeting,
                choice => {
                    let named = choice
                        .and_then(|c| c.get("function"))
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str);
                    let first = match named {
                        Some(name) => match tools.iter().find(|t| t.name == name) {
                            Some(t) => t.clone(),
                            None => {
                                return Err(format!(
                                    "tool_choice names the function '{name}', not in 'tools'"
                                ));
                            }
                        },
                        None => tools[0].clone(),
                    };
                    let mut text = String::new();
                    if let Some(content) = last.and_then(|m| m.get("content")) {
                        content_text(content, &mut text);
                    }
                    let parallel = has_word(&text, "parallel")
                        && req.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
                    let mut calls = vec![first.clone()];
                    if parallel {
                        let second = match (named, tools.get(1)) {
                            (None, Some(t)) => t.clone(),
                            _ => first,
                        };
                        calls.push(second);
                    }
                    Kind::ToolCalls(calls)
                }
            },
            _ => Kind::Greeting,
        };
        Ok(Self { kind, stops, images, image_url_bytes })
    }

    /// The answer for the response numbered `response` (the `<n>` of
    /// `chatcmpl-sim-<n>`), `greeting` being the default text.
    pub(crate) fn answer(&self, response: u64, greeting: String) -> Answer {
        let base = match &self.kind {
            Kind::ToolCalls(tools) => {
                return Answer::ToolCalls(
                    tools
                        .iter()
                        .enumerate()
                        .map(|(i, t)| ToolCall {
                            id: format!("call_{response}_{i}"),
                            name: t.name.clone(),
                            arguments: arguments(t.parameters.as_ref()),
                        })
                        .collect(),
                );
            }
            Kind::Greeting => greeting,
            Kind::ToolResult(content) => format!("Tool result: {content}"),
        };
        Answer::Text(with_images(base, self.images))
    }

    /// The simulated `prompt_tokens` of the request body `body`: its bytes
    /// divided by 4 (rounded down), where each image part counts
    /// [`IMAGE_TOKENS`] instead of its URL's bytes.
    pub(crate) fn prompt_tokens(&self, body_len: usize) -> u64 {
        if self.images == 0 {
            return body_len as u64 / 4;
        }
        body_len.saturating_sub(self.image_url_bytes) as u64 / 4 + IMAGE_TOKENS * self.images as u64
    }

    /// Where the earliest stop string starts in `text`, and which one it is
    /// (the first listed among those starting there).
    pub(crate) fn stop_match(&self, text: &str) -> Option<(usize, String)> {
        let mut best: Option<(usize, &String)> = None;
        for stop in &self.stops {
            if let Some(at) = text.find(stop.as_str()) {
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, stop));
                }
            }
        }
        best.map(|(at, s)| (at, s.clone()))
    }
}

/// `text` followed by ` [1 image]` / ` [N images]` when there are images.
fn with_images(mut text: String, images: usize) -> String {
    match images {
        0 => {}
        1 => text.push_str(" [1 image]"),
        n => text.push_str(&format!(" [{n} images]")),
    }
    text
}

/// The `stop` field: absent, `null`, a string or an array of strings.
fn stops(stop: Option<&Value>) -> Result<Vec<String>, String> {
    let bad = || "field 'stop' must be a string or an array of strings".to_owned();
    let list = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            items.iter().map(|s| s.as_str().map(str::to_owned).ok_or_else(bad)).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad()),
    };
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

/// The function tools of `tools` (absent, `null`, or an array whose items
/// all have a string `function.name`).
fn tools(tools: Option<&Value>) -> Result<Vec<Tool>, String> {
    let items = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("field 'tools' must be an array".to_owned()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let function = t.get("function");
            let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
            match name {
                Some(name) => Ok(Tool {
                    name: name.to_owned(),
                    parameters: function.and_then(|f| f.get("parameters")).cloned(),
                }),
                None => Err(format!("tools[{i}].function.name is required and must be a string")),
            }
        })
        .collect()
}

/// The number of `image_url` parts in all messages, and the bytes of their
/// URLs.
fn images(messages: &[Value]) -> (usize, usize) {
    let mut count = 0;
    let mut bytes = 0;
    for m in messages {
        let Some(parts) = m.get("content").and_then(Value::as_array) else { continue };
        for part in parts {
            if part.get("type").and_then(Value::as_str) == Some("image_url") {
                count += 1;
                let url =
                    part.get("image_url").and_then(|u| u.get("url").or(Some(u))).and_then(Value::as_str);
                bytes += url.map_or(0, str::len);
            }
        }
    }
    (count, bytes)
}

/// The text of a `content` value: a string, or the `text` of each part of
/// an array, concatenated.
fn content_text(content: &Value, out: &mut String) {
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

/// Whether `word` is one of `text`'s words (runs of alphanumerics),
/// ignoring ASCII case.
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric()).any(|w| w.eq_ignore_ascii_case(word))
}

/// The arguments of a call to a function with JSON schema `parameters`:
/// the `required` properties (or the alphabetically first property when
/// none is required), each with a value by its type, as compact JSON.
pub(crate) fn arguments(parameters: Option<&Value>) -> String {
    let properties = parameters.and_then(|p| p.get("properties")).and_then(Value::as_object);
    let mut names: Vec<&str> = parameters
        .and_then(|p| p.get("required"))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(properties.and_then(|p| p.keys().map(String::as_str).min()));
    }
    names.sort_unstable();
    names.dedup();
    let mut out = Map::new();
    for name in names {
        let schema = properties.and_then(|p| p.get(name));
        out.insert(name.to_owned(), value_for(name, schema));
    }
    Value::Object(out).to_string()
}

/// A value for property `name` of schema `schema`: its first `enum` value if
/// it has one, else by its `type` (the first non-`null` one of a list):
/// `"<name> value"` for a string (and a missing or unknown type), `1` for an
/// integer or number, `true`, `[]` or `{}`.
fn value_for(name: &str, schema: Option<&Value>) -> Value {
    if let Some(first) = schema.and_then(|s| s.get("enum")).and_then(Value::as_array).and_then(|e| e.first())
    {
        return first.clone();
    }
    let ty = match schema.and_then(|s| s.get("type")) {
        Some(Value::String(t)) => Some(t.as_str()),
        Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    };
    match ty {
        Some("integer" | "number") => Value::from(1),
        Some("boolean") => Value::Bool(true),
        Some("array") => Value::Array(Vec::new()),
        Some("object") => Value::Object(Map::new()),
        Some("null") => Value::Null,
        _ => Value::String(format!("{name} value")),
    }
}

/// `arguments` in [`ARGUMENT_PIECES`] roughly equal pieces (cut at char
/// counts `len·k/3`), empty pieces left out.
pub(crate) fn argument_pieces(arguments: &str) -> Vec<&str> {
    let len = arguments.chars().count();
    let mut cuts: Vec<usize> = (1..ARGUMENT_PIECES)
        .map(|k| arguments.char_indices().nth(len * k / ARGUMENT_PIECES).map_or(arguments.len(), |(i, _)| i))
        .collect();
    cuts.insert(0, 0);
    cuts.push(arguments.len());
    cuts.windows(2).map(|w| &arguments[w[0]..w[1]]).filter(|p| !p.is_empty()).collect()
}

/// Splits `text` into `n` pieces: one word each (split at spaces, every word
/// after the first keeping its leading space), after filler words ` [1]`,
/// ` [2]`, … are appended until there are `n` words; the last piece holds
/// the rest.
pub(crate) fn text_pieces(text: &str, n: usize) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    let mut words: Vec<String> = text
        .split(' ')
        .enumerate()
        .map(|(i, w)| if i == 0 { w.to_owned() } else { format!(" {w}") })
        .collect();
    let mut i = 1;
    while words.len() < n {
        words.push(format!(" [{i}]"));
        i += 1;
    }
    let tail: String = words.split_off(n - 1).concat();
    words.push(tail);
    words
}

/// `pieces` cut so that their concatenation is its first `at` bytes; pieces
/// that become empty are dropped, but one (empty) piece is kept if all are.
pub(crate) fn cut_pieces(pieces: Vec<String>, at: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(pieces.len());
    let mut pos = 0;
    for mut piece in pieces {
        if pos >= at {
            break;
        }
        if pos + piece.len() > at {
            piece.truncate(at - pos);
        }
        pos += piece.len();
        out.push(piece);
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plan(req: Value) -> Result<Plan, String> {
        Plan::from_request(req.as_object().unwrap_or(&Map::new()))
    }

    fn calls(req: Value) -> Vec<ToolCall> {
        match plan(req).map(|p| p.answer(7, "hi".to_owned())) {
            Ok(Answer::ToolCalls(c)) => c,
            other => panic!("no tool calls: {other:?}"),
        }
    }

    fn text(req: Value) -> String {
        match plan(req).map(|p| p.answer(7, "hi".to_owned())) {
            Ok(Answer::Text(t)) => t,
            other => panic!("no text: {other:?}"),
        }
    }

    fn tool(name: &str, parameters: Value) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": parameters}})
    }

    #[test]
    fn arguments_follow_the_schema() {
        let p = json!({
            "type": "object",
            "properties": {
                "path": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"},
                "flag": {"type": "boolean"}, "list": {"type": "array"}, "obj": {"type": "object"},
                "unit": {"type": "string", "enum": ["celsius", "kelvin"]}, "opt": {"type": ["null", "integer"]},
            },
            "required": ["path", "n", "x", "flag", "list", "obj", "unit", "opt", "missing"],
        });
        assert_eq!(
            arguments(Some(&p)),
            r#"{"flag":true,"list":[],"missing":"missing value","n":1,"obj":{},"opt":1,"path":"path value","unit":"celsius","x":1}"#
        );
        // No `required`: the alphabetically first property.
        let p = json!({"properties": {"zeta": {"type": "string"}, "alpha": {"type": "boolean"}}});
        assert_eq!(arguments(Some(&p)), r#"{"alpha":true}"#);
        assert_eq!(arguments(Some(&json!({"type": "object"}))), "{}");
        assert_eq!(arguments(None), "{}");
    }

    #[test]
    fn argument_pieces_are_three_on_char_boundaries() {
        assert_eq!(argument_pieces(r#"{"path":"path value"}"#), [r#"{"path""#, r#":"path "#, r#"value"}"#]);
        assert_eq!(argument_pieces("{}"), ["{", "}"]);
        let s = r#"{"é":"ééé"}"#;
        let p = argument_pieces(s);
        assert_eq!(p.len(), 3);
        assert_eq!(p.concat(), s);
    }

    #[test]
    fn tool_call_rules() {
        let tools = json!([
            tool("read", json!({"properties": {"path": {"type": "string"}}, "required": ["path"]})),
            tool("list", json!({"properties": {"dir": {"type": "string"}}}))
        ]);
        let user = |text: &str| json!([{"role": "user", "content": text}]);
        let c = calls(json!({"tools": tools, "messages": user("go")}));
        assert_eq!(
            c,
            [ToolCall {
                id: "call_7_0".into(),
                name: "read".into(),
                arguments: r#"{"path":"path value"}"#.into()
            }]
        );
        let c = calls(json!({"tools": tools, "messages": user("in Parallel, please")}));
        assert_eq!(
            c.iter().map(|c| (c.id.as_str(), c.name.as_str())).collect::<Vec<_>>(),
            [("call_7_0", "read"), ("call_7_1", "list")]
        );
        // `parallels` is another word.
        assert_eq!(calls(json!({"tools": tools, "messages": user("parallels")})).len(), 1);
        assert_eq!(
            calls(json!({"tools": tools, "messages": user("parallel"), "parallel_tool_calls": false})).len(),
            1
        );
        let named = json!({"type": "function", "function": {"name": "list"}});
        let c = calls(json!({"tools": tools, "tool_choice": named, "messages": user("parallel")}));
        assert_eq!(c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["list", "list"]);
        let c = calls(
            json!({"tools": [tools[0]], "messages": [{"role": "user", "content": [{"type": "text", "text": "parallel"}]}]}),
        );
        assert_eq!(c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["read", "read"]);
        // No calls: tool_choice none, last message not from the user, no tools.
        assert_eq!(text(json!({"tools": tools, "tool_choice": "none", "messages": user("go")})), "hi");
        assert_eq!(text(json!({"tools": tools, "messages": [{"role": "assistant", "content": "x"}]})), "hi");
        assert_eq!(text(json!({"tools": [], "messages": user("go")})), "hi");
        // Errors.
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert!(plan(json!({"tools": tools, "tool_choice": unknown, "messages": user("go")})).is_err());
        assert!(plan(json!({"tools": [{"type": "function"}], "messages": user("go")})).is_err());
        assert!(plan(json!({"tools": {}, "messages": user("go")})).is_err());
    }

    #[test]
    fn tool_results_images_and_stops() {
        let result =
            json!([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c", "content": "42"}]);
        assert_eq!(text(json!({"messages": result})), "Tool result: 42");
        let parts = json!([{"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
        assert_eq!(text(json!({"messages": parts})), "Tool result: ab");
        let img = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});
        let two = json!([{"role": "user", "content": [{"type": "text", "text": "see"}, img("data:image/png;base64,AAAA"), img("http://x/y.png")]}]);
        let p = plan(json!({"messages": two})).unwrap();
        assert_eq!((p.images, p.image_url_bytes), (2, 26 + 14));
        assert_eq!(p.prompt_tokens(1000), (1000 - 40) / 4 + 2 * IMAGE_TOKENS);
        assert_eq!(text(json!({"messages": two})), "hi [2 images]");
        assert_eq!(text(json!({"messages": [{"role": "user", "content": [img("u")]}]})), "hi [1 image]");
        assert_eq!(plan(json!({"messages": []})).unwrap().prompt_tokens(7), 1);

        let p = plan(json!({"stop": ["NIM", "", "simulated", "sim"], "messages": []})).unwrap();
        assert_eq!(p.stops, ["NIM", "simulated", "sim"]);
        assert_eq!(p.stop_match("Hello from the simulated NIM"), Some((15, "simulated".to_owned())));
        assert_eq!(p.stop_match("Hello"), None);
        assert_eq!(plan(json!({"stop": "x"})).unwrap().stops, ["x"]);
        assert!(plan(json!({"stop": 3})).is_err());
        assert!(plan(json!({"stop": ["a", 3]})).is_err());
    }

    #[test]
    fn pieces_and_cuts() {
        assert_eq!(text_pieces("a b", 4), ["a", " b", " [1]", " [2]"]);
        assert_eq!(text_pieces("a b c d", 2), ["a", " b c d"]);
        assert!(text_pieces("a", 0).is_empty());
        let p = text_pieces("Hello from the sim", 4);
        assert_eq!(cut_pieces(p.clone(), 7), ["Hello", " f"]);
        assert_eq!(cut_pieces(p.clone(), 5), ["Hello"]);
        assert_eq!(cut_pieces(p.clone(), 0), [""]);
        assert_eq!(cut_pieces(p, 100).concat(), "Hello from the sim");
    }
}
