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

/// The end of the string starting at `b[i] == '"'` (just past its closing quote).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The end of the value starting at `b[i]`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                j += 1;
            }
            (j > i).then_some(j)
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
pub(crate) fn model(body: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let mut found = None;
    visit_members(body, |m| {
        if &body[m.key.clone()] == b"model" {
            found = Some(m.value.clone());
            return false;
        }
        true
    })?;
    let raw = &body[found?];
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(std::borrow::Cow::Borrowed);
    }
    serde_json::from_slice::<String>(raw).ok().map(std::borrow::Cow::Owned)
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
    fn rewriting_the_model_keeps_every_other_byte() {
        let body = br#"{ "messages": [{"role":"user","content":"hi \"model\""}],
  "model" : "llama-70b", "stream": true }"#;
        let out = rewrite(body, Some("meta/llama-3.3-70b-instruct"), &[]).unwrap();
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
