//! Server-sent events as the cache sees them: where an event ends, whether
//! it reports an error, and whether a recorded stream is complete.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Where the event that starts at `from` ends: just past the blank line
/// that closes it (blank lines before its first line belong to it). `None`
/// when `buf` holds no complete event from `from`.
///
/// Lines end with LF, CRLF or a lone CR, as the SSE spec allows; `buf` is a
/// whole stream (a CR at its very end ends a line).
pub(crate) fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut pos = from;
    let mut has_line = false;
    loop {
        let rest = buf.get(pos..)?;
        let at = memchr::memchr2(b'\n', b'\r', rest)?;
        let terminator = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') { 2 } else { 1 };
        pos += at + terminator;
        if at > 0 {
            has_line = true;
        } else if has_line {
            return Some(pos);
        }
    }
}

/// The lines of one event, without their terminators.
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match memchr::memchr2(b'\n', b'\r', rest) {
            Some(at) => {
                let terminator = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') { 2 } else { 1 };
                (&rest[..at], &rest[at + terminator..])
            }
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        Some(line)
    })
}

/// What the cache needs to know of one event.
#[derive(Debug, PartialEq, Eq)]
struct Event<'a> {
    /// Its `event:` field (the last one).
    kind: Option<&'a [u8]>,
    /// Its `data:` lines joined with LF; `None` without any.
    data: Option<Cow<'a, [u8]>>,
}

impl<'a> Event<'a> {
    fn parse(event: &'a [u8]) -> Self {
        let mut out = Event { kind: None, data: None };
        for line in lines(event).filter(|l| !l.is_empty() && l[0] != b':') {
            let (field, value) = match memchr::memchr(b':', line) {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &line[line.len()..]),
            };
            match field {
                b"event" => out.kind = Some(value),
                b"data" => {
                    out.data = Some(match out.data.take() {
                        None => Cow::Borrowed(value),
                        Some(prev) => {
                            let mut joined = prev.into_owned();
                            joined.push(b'\n');
                            joined.extend_from_slice(value);
                            Cow::Owned(joined)
                        }
                    })
                }
                _ => {}
            }
        }
        out
    }

    fn is_done(&self) -> bool {
        self.data.as_deref() == Some(b"[DONE]")
    }

    /// An `event: error`, or data that is a JSON object with a non-null
    /// top-level `error`, or data that looks like an object but does not
    /// parse (broken: not worth replaying).
    fn is_error(&self) -> bool {
        if self.kind == Some(b"error") {
            return true;
        }
        match &self.data {
            Some(data) if data.trim_ascii_start().first() == Some(&b'{') => {
                !matches!(serde_json::from_slice::<HasError>(data), Ok(HasError(false)))
            }
            _ => false,
        }
    }
}

/// Whether a JSON value is an object with a non-null top-level `error`;
/// everything else is skipped without allocating.
struct HasError(bool);

impl<'de> Deserialize<'de> for HasError {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(HasErrorVisitor)
    }
}

struct HasErrorVisitor;

impl<'de> Visitor<'de> for HasErrorVisitor {
    type Value = HasError;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HasError, A::Error> {
        let mut error = false;
        while let Some(key) = map.next_key::<IsError>()? {
            if key.0 {
                error |= map.next_value::<Option<IgnoredAny>>()?.is_some();
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(HasError(error))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<HasError, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(HasError(false))
    }

    fn visit_bool<E>(self, _: bool) -> Result<HasError, E> {
        Ok(HasError(false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<HasError, E> {
        Ok(HasError(false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<HasError, E> {
        Ok(HasError(false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<HasError, E> {
        Ok(HasError(false))
    }
    fn visit_str<E>(self, _: &str) -> Result<HasError, E> {
        Ok(HasError(false))
    }
    fn visit_unit<E>(self) -> Result<HasError, E> {
        Ok(HasError(false))
    }
}

/// An object key that is (or is not) `error`, escapes decoded, compared
/// without keeping it.
struct IsError(bool);

impl<'de> Deserialize<'de> for IsError {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = IsError;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<IsError, E> {
                Ok(IsError(key == "error"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Records an SSE answer as it passes to the client, to store it if, and
/// only if, it is complete.
///
/// Push every chunk the client is sent, in order, split anywhere; then
/// [`finish`](Self::finish). The recorder gives up, and frees what it held,
/// as soon as the stream passes its limit (`cache.max_entry_bytes`).
#[derive(Debug)]
pub struct StreamRecorder {
    buf: BytesMut,
    limit: usize,
    gave_up: bool,
}

impl StreamRecorder {
    /// A recorder that keeps at most `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        Self { buf: BytesMut::new(), limit, gave_up: false }
    }

    /// Adds the next chunk the client is sent. Returns whether the recorder
    /// still records (false once the stream is over its limit: pushing more
    /// is harmless and does nothing).
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        if self.gave_up {
            return false;
        }
        if self.buf.len().saturating_add(chunk.len()) > self.limit {
            self.gave_up = true;
            self.buf = BytesMut::new();
            return false;
        }
        self.buf.extend_from_slice(chunk);
        true
    }

    /// Still recording (not over the limit).
    pub fn is_recording(&self) -> bool {
        !self.gave_up
    }

    /// Bytes held so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The whole stream, if it can be stored, else `None`. It can be when:
    ///
    /// - it stayed within the limit;
    /// - every event is closed by its blank line (nothing cut mid-event;
    ///   extra blank lines at the end are fine);
    /// - no event is an error: `event: error`, data that is a JSON object
    ///   with a non-null top-level `"error"`, or data that looks like an
    ///   object and does not parse;
    /// - the last event is `data: [DONE]`.
    pub fn finish(self) -> Option<Bytes> {
        if self.gave_up {
            return None;
        }
        let buf = self.buf.freeze();
        let mut pos = 0;
        let mut last_done = false;
        while let Some(end) = event_end(&buf, pos) {
            let event = Event::parse(&buf[pos..end]);
            if event.is_error() {
                return None;
            }
            last_done = event.is_done();
            pos = end;
        }
        let tail_blank = buf[pos..].iter().all(|b| matches!(b, b'\n' | b'\r'));
        (last_done && tail_blank).then_some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OK: &str = concat!(
        "data: {\"id\":\"c1\",\"created\":7,\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"id\":\"c1\",\"created\":7,\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: [DONE]\n\n",
    );

    fn record(chunks: &[&[u8]], limit: u64) -> Option<Bytes> {
        let mut r = StreamRecorder::new(limit);
        for c in chunks {
            r.push(c);
        }
        r.finish()
    }

    fn whole(s: &str) -> Option<Bytes> {
        record(&[s.as_bytes()], 1 << 20)
    }

    #[test]
    fn completeness_table() {
        let crlf = OK.replace('\n', "\r\n");
        let cr = OK.replace('\n', "\r");
        let cases: &[(&str, &str, bool)] = &[
            ("a complete stream", OK, true),
            ("CRLF", &crlf, true),
            ("lone CR", &cr, true),
            ("no space after data:", "data:{\"a\":1}\n\ndata:[DONE]\n\n", true),
            ("comments and extra blank lines", ": ping\n\n\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n\n", true),
            (
                "usage chunk before DONE",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n",
                true,
            ),
            ("error: null is no error", "data: {\"a\":1,\"error\":null}\n\ndata: [DONE]\n\n", true),
            (
                "error nested deeper is not top-level",
                "data: {\"a\":{\"error\":\"x\"}}\n\ndata: [DONE]\n\n",
                true,
            ),
            ("\"error\" inside a string", "data: {\"content\":\"error\"}\n\ndata: [DONE]\n\n", true),
            ("only DONE", "data: [DONE]\n\n", true),
            ("empty", "", false),
            ("no DONE", "data: {\"a\":1}\n\n", false),
            ("DONE without its blank line", "data: {\"a\":1}\n\ndata: [DONE]\n", false),
            ("DONE cut", "data: {\"a\":1}\n\ndata: [DO", false),
            ("something after DONE", "data: [DONE]\n\ndata: {\"a\":1}\n\n", false),
            ("a partial event after DONE", "data: [DONE]\n\ndata: {\"a\"", false),
            ("comment after DONE", "data: [DONE]\n\n: bye\n\n", false),
            (
                "an error object",
                "data: {\"a\":1}\n\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\ndata: [DONE]\n\n",
                false,
            ),
            ("an escaped error key", "data: {\"\\u0065rror\":\"x\"}\n\ndata: [DONE]\n\n", false),
            ("an error string", "data: {\"error\":\"boom\",\"id\":1}\n\ndata: [DONE]\n\n", false),
            ("event: error", "event: error\ndata: boom\n\ndata: [DONE]\n\n", false),
            ("a broken object", "data: {\"a\":1\n\ndata: [DONE]\n\n", false),
            ("an object with trailing bytes", "data: {\"a\":1} x\n\ndata: [DONE]\n\n", false),
            ("data that is not an object", "data: hello\n\ndata: 42\n\ndata: [DONE]\n\n", true),
            ("DONE in a multi-line data", "data: [DONE]\ndata: more\n\n", false),
            ("not DONE but done", "data: [done]\n\n", false),
        ];
        for (what, stream, complete) in cases {
            let got = whole(stream);
            assert_eq!(got.is_some(), *complete, "{what}: {stream:?}");
            if let Some(bytes) = got {
                assert_eq!(bytes, stream.as_bytes(), "{what}: stored as sent");
            }
        }
    }

    #[test]
    fn every_split_point_and_every_pair_of_them_gives_the_same_verdict() {
        let fixtures = [
            OK.to_owned(),
            OK.replace('\n', "\r\n"),
            "data: {\"a\":1}\n\ndata: {\"error\":{\"code\":500}}\n\ndata: [DONE]\n\n".to_owned(),
            "data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n".to_owned(),
        ];
        for stream in &fixtures {
            let bytes = stream.as_bytes();
            let want = whole(stream);
            for i in 0..=bytes.len() {
                assert_eq!(record(&[&bytes[..i], &bytes[i..]], 1 << 20), want, "split at {i} of {stream:?}");
                for j in i..=bytes.len() {
                    let got = record(&[&bytes[..i], &bytes[i..j], &bytes[j..]], 1 << 20);
                    assert_eq!(got, want, "split at {i} and {j} of {stream:?}");
                }
            }
        }
        assert!(whole(&fixtures[0]).is_some() && whole(&fixtures[1]).is_some());
        assert!(whole(&fixtures[2]).is_none() && whole(&fixtures[3]).is_none());
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_verdict(cuts in proptest::collection::vec(0usize..400, 0..12), crlf: bool) {
            let stream = if crlf { OK.replace('\n', "\r\n") } else { OK.to_owned() };
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut r = StreamRecorder::new(1 << 20);
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                r.push(&bytes[at..cut]);
                at = cut;
            }
            prop_assert_eq!(r.finish(), Some(Bytes::copy_from_slice(bytes)));
        }
    }

    #[test]
    fn over_the_limit_it_gives_up_and_frees_its_buffer() {
        let len = OK.len() as u64;
        assert!(record(&[OK.as_bytes()], len).is_some(), "exactly at the limit is fine");
        let mut r = StreamRecorder::new(len - 1);
        let (head, tail) = OK.as_bytes().split_at(10);
        assert!(r.push(head));
        assert_eq!(r.len(), 10);
        assert!(!r.push(tail));
        assert!(!r.is_recording());
        assert!(r.is_empty(), "freed");
        assert!(!r.push(b""), "stays given up");
        assert_eq!(r.finish(), None);
    }

    #[test]
    fn event_ends() {
        assert_eq!(event_end(b"data: a\n\n", 0), Some(9));
        assert_eq!(event_end(b"data: a\n", 0), None);
        assert_eq!(event_end(b"\n\ndata: a\n\nx", 0), Some(11), "leading blank lines belong to the event");
        assert_eq!(event_end(b"data: a\r\n\r\n", 0), Some(11));
        assert_eq!(event_end(b"data: a\r\rx", 0), Some(9));
        assert_eq!(event_end(b"data: a\n\n", 9), None);
        assert_eq!(event_end(b"", 3), None);
    }

    #[test]
    fn events_parse_their_fields() {
        let e = Event::parse(b": c\nevent: x\nid: 3\ndata: a\ndata:b\ndata\n\n");
        assert_eq!(e.kind, Some(&b"x"[..]));
        assert_eq!(e.data.as_deref(), Some(&b"a\nb\n"[..]));
        assert_eq!(Event::parse(b": only a comment\n\n").data, None);
    }
}
