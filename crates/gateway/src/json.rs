//! Reading and editing the top level of a JSON request body without parsing
//! the rest of it: the `model` a request names, and the body with another
//! `model` or without fields a provider rejects. Everything else in the body
//! stays byte for byte as the client sent it.

use std::ops::Range;

use bytes::Bytes;

/// One member of the top-level object: where its key (inside the quotes) and
/// its value are in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The key's raw bytes, without the quotes (escapes not decoded).
    pub(crate) key: Range<usize>,
    /// The value's bytes.
    pub(crate) value: Range<usize>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end of the string starting at `b[i] == '"'` (just past its closing
/// quote). Jumps from quote or backslash to the next with SIMD search.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[j] == b'"' {
            return Some(j + 1);
        }
        j += 2; // an escape: skip the escaped byte
    }
}

/// The end of the value starting at `b[i]`. An array (or object) ends at the
/// bracket (or brace) that balances its own kind outside strings: in valid
/// JSON the other kind nests within, so only three bytes are searched for.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    let (open, close) = match *b.get(i)? {
        b'"' => return skip_string(b, i),
        b'{' => (b'{', b'}'),
        b'[' => (b'[', b']'),
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                j += 1;
            }
            return (j > i).then_some(j);
        }
    };
    let mut depth = 0usize;
    let mut j = i;
    loop {
        j += memchr::memchr3(b'"', open, close, b.get(j..)?)?;
        match b[j] {
            b'"' => j = skip_string(b, j)?,
            c if c == open => {
                depth += 1;
                j += 1;
            }
            _ => {
                depth -= 1; // a close before any open cannot happen: b[i] is an open
                if depth == 0 {
                    return Some(j + 1);
                }
                j += 1;
            }
        }
    }
}

/// Calls `visit` with each top-level member of the object in `body`, in
/// order, until it returns `false`. `None` when `body` is not a JSON object
/// (as far as the top level shows).
pub(crate) fn visit_members(body: &[u8], mut visit: impl FnMut(&Member) -> bool) -> Option<()> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(body, i + 1);
    if body.get(i) == Some(&b'}') {
        return Some(());
    }
    loop {
        if body.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(body, i)?;
        let key = i + 1..key_end - 1;
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(body, i + 1);
        let end = skip_value(body, start)?;
        if !visit(&Member { key, value: start..end }) {
            return Some(());
        }
        i = skip_ws(body, end);
        match body.get(i) {
            Some(b',') => i = skip_ws(body, i + 1),
            Some(b'}') => return Some(()),
            _ => return None,
        }
    }
}

/// The top-level `model` of a JSON request body, decoded; `None` when the
/// body is not a JSON object or has no string `model`.
#[cfg(test)]
pub(crate) fn model(body: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    model_span(body).map(|(_, model)| model)
}

/// The top-level `model` of a JSON request body, decoded, with where its
/// value (quotes included) is in the body; `None` when the body is not a
/// JSON object or has no string `model`.
pub(crate) fn model_span(body: &[u8]) -> Option<(Range<usize>, std::borrow::Cow<'_, str>)> {
    let mut found = None;
    visit_members(body, |m| {
        if &body[m.key.clone()] == b"model" {
            found = Some(m.value.clone());
            return false;
        }
        true
    })?;
    let span = found?;
    let raw = &body[span.clone()];
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let model = if inner.contains(&b'\\') {
        std::borrow::Cow::Owned(serde_json::from_slice::<String>(raw).ok()?)
    } else {
        std::borrow::Cow::Borrowed(std::str::from_utf8(inner).ok()?)
    };
    Some((span, model))
}

/// `body` with the bytes at `span` (a value) replaced by `json`: one
/// allocation of the final size, two copies.
pub(crate) fn splice(body: &[u8], span: Range<usize>, json: &str) -> Bytes {
    let mut out = Vec::with_capacity(body.len() - span.len() + json.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// A streaming request's body with `stream_options.include_usage: true`
/// added: `None` when the request does not stream (`"stream": true`), or
/// already asks for usage, or is not a JSON object. Other members keep
/// their bytes; an existing `stream_options` object keeps its other fields.
pub(crate) fn with_stream_usage(body: &[u8]) -> Option<Bytes> {
    let mut streams = false;
    let mut options: Option<Member> = None;
    visit_members(body, |m| {
        match &body[m.key.clone()] {
            b"stream" => streams = &body[m.value.clone()] == b"true",
            b"stream_options" => options = Some(m.clone()),
            _ => {}
        }
        true
    })?;
    if !streams {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 40);
    match options {
        None => {
            // Before the object's closing brace.
            let end = body.iter().rposition(|&b| b == b'}')?;
            out.extend_from_slice(&body[..end]);
            out.extend_from_slice(br#","stream_options":{"include_usage":true}"#);
            out.extend_from_slice(&body[end..]);
        }
        Some(m) => {
            let mut value: serde_json::Value = serde_json::from_slice(&body[m.value.clone()]).ok()?;
            let object = value.as_object_mut()?;
            if object.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
                return None;
            }
            object.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
            out.extend_from_slice(&body[..m.value.start]);
            out.extend_from_slice(value.to_string().as_bytes());
            out.extend_from_slice(&body[m.value.end..]);
        }
    }
    Some(Bytes::from(out))
}

/// `body` with its top-level `model` set to `model` (when given) and the
/// top-level members named in `strip` removed. Only what changes is
/// rewritten: the other members keep their bytes. `None` when `body` is not
/// a JSON object, or nothing would change.
pub(crate) fn rewrite(body: &[u8], model: Option<&str>, strip: &[Box<str>]) -> Option<Bytes> {
    let mut members = Vec::new();
    visit_members(body, |m| {
        members.push(m.clone());
        true
    })?;
    let is_stripped = |m: &Member| strip.iter().any(|s| s.as_bytes() == &body[m.key.clone()]);
    let model_at = members.iter().position(|m| &body[m.key.clone()] == b"model");
    let new_model = model.map(|m| serde_json::Value::String(m.to_owned()).to_string());
    let model_changes = match (model_at, &new_model) {
        (Some(at), Some(new)) => body[members[at].value.clone()] != *new.as_bytes(),
        _ => false,
    };
    let strips = members.iter().any(is_stripped);
    if !model_changes && !strips {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 32);
    if !strips {
        // Only the model's value changes: splice it, keep every other byte.
        let (Some(at), Some(new)) = (model_at, new_model) else { return None };
        let value = members[at].value.clone();
        out.extend_from_slice(&body[..value.start]);
        out.extend_from_slice(new.as_bytes());
        out.extend_from_slice(&body[value.end..]);
        return Some(Bytes::from(out));
    }
    out.push(b'{');
    let mut first = true;
    for (i, m) in members.iter().enumerate() {
        if is_stripped(m) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        // The member from its key's opening quote to its value's end.
        out.extend_from_slice(&body[m.key.start - 1..m.value.start]);
        match (&new_model, Some(i) == model_at) {
            (Some(new), true) => out.extend_from_slice(new.as_bytes()),
            _ => out.extend_from_slice(&body[m.value.clone()]),
        }
    }
    out.push(b'}');
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_asks_for_usage_unless_it_did() {
        let add = |b: &str| with_stream_usage(b.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap());
        assert_eq!(
            add(r#"{"model":"m","stream":true}"#).as_deref(),
            Some(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            add(r#"{"stream":true,"stream_options":{"continuous_usage_stats":false}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"continuous_usage_stats":false,"include_usage":true}}"#)
        );
        assert_eq!(add(r#"{"stream":true,"stream_options":{"include_usage":true}}"#), None, "asked already");
        assert_eq!(add(r#"{"stream":false}"#), None);
        assert_eq!(add(r#"{"model":"m"}"#), None);
        assert_eq!(add("not json"), None);
    }

    #[test]
    fn the_model_is_found_at_the_top_level_only() {
        let cases: [(&str, Option<&str>); 9] = [
            (r#"{"model":"meta/llama-3.3-70b-instruct","messages":[]}"#, Some("meta/llama-3.3-70b-instruct")),
            (r#" { "messages" : [{"model":"inner"}] , "model" : "outer" } "#, Some("outer")),
            (r#"{"a":{"model":"x"},"b":"}\"{","model":"m\u002fx"}"#, Some("m/x")),
            (r#"{"n":1.5e3,"t":true,"model":"m"}"#, Some("m")),
            (r#"{"model":42}"#, None),
            (r#"{"messages":[]}"#, None),
            (r#"[{"model":"x"}]"#, None),
            (r#"{"model":"unterminated}"#, None),
            ("", None),
        ];
        for (body, want) in cases {
            assert_eq!(model(body.as_bytes()).as_deref(), want, "{body}");
        }
    }

    #[test]
    fn values_of_the_other_bracket_kind_nest_inside() {
        let body = br#"{"messages":[{"content":"a ] } [ {","x":[1,{"y":"]"}]},"\\"],"tools":{"a":[{"b":"}"}]},"model":"m"}"#;
        assert_eq!(model(body).as_deref(), Some("m"));
        let big = format!(
            r#"{{"messages":[{}{{"role":"user","content":"x"}}],"model":"late"}}"#,
            r#"{"role":"user","content":"hello \"there\" [ { "},"#.repeat(2000)
        );
        assert_eq!(model(big.as_bytes()).as_deref(), Some("late"));
        let out = rewrite(big.as_bytes(), Some("other"), &[]).unwrap();
        assert_eq!(out.len(), big.len() + 1);
        assert!(out.ends_with(br#""model":"other"}"#));
    }

    #[test]
    fn rewriting_the_model_keeps_every_other_byte() {
        let body = br#"{ "messages": [{"role":"user","content":"hi \"model\""}],
  "model" : "llama-70b", "stream": true }"#;
        let out = rewrite(body, Some("meta/llama-3.3-70b-instruct"), &[]).unwrap();
        let (span, _) = model_span(body).unwrap();
        assert_eq!(splice(body, span, r#""meta/llama-3.3-70b-instruct""#), out, "the same bytes");
        let want = br#"{ "messages": [{"role":"user","content":"hi \"model\""}],
  "model" : "meta/llama-3.3-70b-instruct", "stream": true }"#;
        assert_eq!(&out[..], &want[..]);
        assert!(rewrite(body, Some("llama-70b"), &[]).is_none(), "nothing changes");
        assert!(rewrite(b"not json", Some("x"), &[]).is_none());
        let quoted = rewrite(br#"{"model":"a"}"#, Some("we\"ird"), &[]).unwrap();
        assert_eq!(&quoted[..], br#"{"model":"we\"ird"}"#);
    }

    #[test]
    fn stripping_removes_only_the_named_top_level_fields() {
        let strip: Vec<Box<str>> = vec!["logprobs".into(), "logit_bias".into()];
        let body = br#"{"logprobs":true,"model":"a","messages":[{"logprobs":1}],"logit_bias":{"1":2}}"#;
        let out = rewrite(body, Some("b"), &strip).unwrap();
        assert_eq!(&out[..], br#"{"model":"b","messages":[{"logprobs":1}]}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["messages"][0]["logprobs"], 1);
        assert!(rewrite(br#"{"model":"a"}"#, None, &strip).is_none());
        let only = rewrite(br#"{"logit_bias":{}}"#, None, &strip).unwrap();
        assert_eq!(&only[..], b"{}");
    }
}
