//! What is stored: an answer, as the client saw it, with when and what.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::CacheError;
use crate::sse;

/// Opens every encoded entry: `PPCE` and the format's version.
const MAGIC: &[u8; 4] = b"PPCE";
const FORMAT: u8 = 1;
const FLAG_STREAM: u8 = 1;
const FLAG_PROMPT: u8 = 2;
const FLAG_COMPLETION: u8 = 4;

/// The stored answer's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A plain answer (JSON), byte for byte.
    Plain(Bytes),
    /// A complete SSE stream as the client saw it, every event with its
    /// blank line, ending with `data: [DONE]` and its blank line (what
    /// [`StreamRecorder::finish`](crate::StreamRecorder::finish) gives).
    Stream(Bytes),
}

impl Body {
    /// Its bytes.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Self::Plain(b) | Self::Stream(b) => b,
        }
    }

    /// It is a stream.
    pub fn is_stream(&self) -> bool {
        matches!(self, Self::Stream(_))
    }
}

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When it was stored, Unix milliseconds (for the `age` header).
    pub stored_at_unix_ms: u64,
    /// The answer's `Content-Type`.
    pub content_type: String,
    /// The answer.
    pub body: Body,
    /// The upstream's `usage.prompt_tokens`, for the ledger of a hit.
    pub prompt_tokens: Option<u64>,
    /// The upstream's `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
}

impl Entry {
    /// `body` of `content_type`, stored at `stored_at_unix_ms` (see
    /// [`now_unix_ms`]), without token counts.
    pub fn new(body: Body, content_type: impl Into<String>, stored_at_unix_ms: u64) -> Self {
        Self {
            stored_at_unix_ms,
            content_type: content_type.into(),
            body,
            prompt_tokens: None,
            completion_tokens: None,
        }
    }

    /// The same entry with the upstream's token counts.
    pub fn with_tokens(mut self, prompt: Option<u64>, completion: Option<u64>) -> Self {
        self.prompt_tokens = prompt;
        self.completion_tokens = completion;
        self
    }

    /// How long ago it was stored, at `now_unix_ms` (zero if the clock went
    /// back). The `age` header is its whole seconds.
    pub fn age(&self, now_unix_ms: u64) -> Duration {
        Duration::from_millis(now_unix_ms.saturating_sub(self.stored_at_unix_ms))
    }

    /// The bytes it holds: body and content type (what
    /// [`CacheSettings::max_entry_bytes`](crate::CacheSettings::max_entry_bytes)
    /// bounds).
    pub fn weight(&self) -> u64 {
        let len = self.body.bytes().len() + self.content_type.len();
        u64::try_from(len).unwrap_or(u64::MAX)
    }

    /// A stream's events in order, each with its blank line, as slices of
    /// the stored bytes (no copy), to replay one by one; nothing for a plain
    /// body. Together they are the stored bytes exactly.
    pub fn stream_events(&self) -> Events {
        match &self.body {
            Body::Stream(bytes) => Events { rest: bytes.clone() },
            Body::Plain(_) => Events { rest: Bytes::new() },
        }
    }

    /// The entry as bytes (for Redis): `PPCE`, the format's version, flags,
    /// the time stored, the token counts present, the content type and the
    /// body, integers little endian, lengths before what they measure.
    pub fn encode(&self) -> Bytes {
        let body = self.body.bytes();
        let mut out = BytesMut::with_capacity(4 + 2 + 8 * 3 + 4 + self.content_type.len() + 8 + body.len());
        out.put_slice(MAGIC);
        out.put_u8(FORMAT);
        let mut flags = 0;
        if self.body.is_stream() {
            flags |= FLAG_STREAM;
        }
        if self.prompt_tokens.is_some() {
            flags |= FLAG_PROMPT;
        }
        if self.completion_tokens.is_some() {
            flags |= FLAG_COMPLETION;
        }
        out.put_u8(flags);
        out.put_u64_le(self.stored_at_unix_ms);
        if let Some(n) = self.prompt_tokens {
            out.put_u64_le(n);
        }
        if let Some(n) = self.completion_tokens {
            out.put_u64_le(n);
        }
        // A length that does not fit makes decoding fail, never misread.
        out.put_u32_le(u32::try_from(self.content_type.len()).unwrap_or(u32::MAX));
        out.put_slice(self.content_type.as_bytes());
        out.put_u64_le(u64::try_from(body.len()).unwrap_or(u64::MAX));
        out.put_slice(body);
        out.freeze()
    }

    /// The entry [`encode`](Self::encode) made, copied out of `bytes`.
    ///
    /// # Errors
    /// [`CacheError::Decode`] for anything else: another magic or version,
    /// unknown flags, a length past the end, trailing bytes, a content type
    /// that is not UTF-8.
    pub fn decode(bytes: &[u8]) -> Result<Self, CacheError> {
        Self::decode_bytes(Bytes::copy_from_slice(bytes))
    }

    /// [`decode`](Self::decode) that keeps the body as a slice of `bytes`
    /// (no copy of it: a Redis reply can be handed over whole).
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, CacheError> {
        let mut r = Reader { bytes: &bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(decode_error("not a cache entry (no PPCE magic)"));
        }
        if r.u8()? != FORMAT {
            return Err(decode_error("a format version this build does not read"));
        }
        let flags = r.u8()?;
        if flags & !(FLAG_STREAM | FLAG_PROMPT | FLAG_COMPLETION) != 0 {
            return Err(decode_error("unknown flags"));
        }
        let stored_at_unix_ms = r.u64()?;
        let prompt_tokens = if flags & FLAG_PROMPT != 0 { Some(r.u64()?) } else { None };
        let completion_tokens = if flags & FLAG_COMPLETION != 0 { Some(r.u64()?) } else { None };
        let ct_len = usize::try_from(r.u32()?).map_err(|_| decode_error("content type length"))?;
        let content_type = std::str::from_utf8(r.take(ct_len)?)
            .map_err(|_| decode_error("the content type is not UTF-8"))?
            .to_owned();
        let body_len = usize::try_from(r.u64()?).map_err(|_| decode_error("body length"))?;
        let start = r.pos;
        r.take(body_len)?;
        if r.pos != bytes.len() {
            return Err(decode_error("trailing bytes after the body"));
        }
        let body = bytes.slice(start..r.pos);
        let body = if flags & FLAG_STREAM != 0 { Body::Stream(body) } else { Body::Plain(body) };
        Ok(Self { stored_at_unix_ms, content_type, body, prompt_tokens, completion_tokens })
    }
}

fn decode_error(reason: &'static str) -> CacheError {
    CacheError::Decode { reason }
}

/// Bounds-checked reads of an encoded entry.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CacheError> {
        let end = self.pos.checked_add(n).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| decode_error("truncated"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CacheError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CacheError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, CacheError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CacheError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// A stored stream's events, each a [`Bytes`] slice that includes its
/// blank line (see [`Entry::stream_events`]). Owns a reference to the bytes,
/// so it can outlive the entry and move into a response body.
#[derive(Debug, Clone)]
pub struct Events {
    rest: Bytes,
}

impl Iterator for Events {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.rest.is_empty() {
            return None;
        }
        // An unterminated tail (never in what the recorder stores) comes out
        // whole, so that the events always add up to the stored bytes.
        let end = sse::event_end(&self.rest, 0).unwrap_or(self.rest.len());
        Some(self.rest.split_to(end))
    }
}

impl std::iter::FusedIterator for Events {}

/// The system clock in Unix milliseconds (0 before 1970).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream() -> Entry {
        let sse = "data: {\"id\":\"c1\",\"created\":1}\n\ndata: {\"id\":\"c1\",\"created\":1,\"x\":2}\n\ndata: [DONE]\n\n";
        Entry::new(Body::Stream(Bytes::from_static(sse.as_bytes())), "text/event-stream", 1_700_000_000_000)
            .with_tokens(Some(12), Some(34))
    }

    fn plain() -> Entry {
        Entry::new(Body::Plain(Bytes::from_static(b"{\"id\":\"x\"}")), "application/json", 5)
    }

    #[test]
    fn encode_then_decode_gives_the_entry_back() {
        for entry in
            [stream(), plain(), plain().with_tokens(None, Some(3)), plain().with_tokens(Some(0), None)]
        {
            let bytes = entry.encode();
            assert_eq!(Entry::decode(&bytes).ok(), Some(entry.clone()));
            assert_eq!(Entry::decode_bytes(bytes).ok(), Some(entry));
        }
        let empty = Entry::new(Body::Plain(Bytes::new()), "", 0);
        assert_eq!(Entry::decode(&empty.encode()).ok(), Some(empty));
    }

    #[test]
    fn every_truncation_and_every_extension_is_an_error() {
        let bytes = stream().encode();
        for len in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            Entry::decode(&longer),
            Err(CacheError::Decode { reason: "trailing bytes after the body" })
        ));
    }

    #[test]
    fn foreign_bytes_are_refused_with_a_reason() {
        let good = plain().encode().to_vec();
        let mut other_version = good.clone();
        other_version[4] = 2;
        let mut unknown_flag = good.clone();
        unknown_flag[5] |= 0x80;
        let mut huge_length = good.clone();
        let body_len_at = good.len() - 10 - 8; // the body is 10 bytes, its length 8
        huge_length[body_len_at..body_len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        for (bytes, want) in [
            (&b"GET / HTTP/1.1"[..], "not a cache entry"),
            (&other_version[..], "version"),
            (&unknown_flag[..], "flags"),
            (&huge_length[..], "truncated"),
        ] {
            let err = Entry::decode(bytes).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(want), "{err}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Entry::decode(&bytes);
            // The same behind a valid prefix, to reach the deeper fields.
            let mut prefixed = b"PPCE\x01".to_vec();
            prefixed.extend(&bytes);
            let _ = Entry::decode(&prefixed);
        }

        #[test]
        fn any_corruption_of_a_valid_entry_never_panics(at in 0usize..200, byte in any::<u8>()) {
            let mut bytes = stream().encode().to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            if let Ok(entry) = Entry::decode(&bytes) {
                prop_assert_eq!(entry.encode().to_vec(), bytes);
            }
        }
    }

    #[test]
    fn age_in_milliseconds_saturating() {
        let e = plain();
        assert_eq!(e.age(5), Duration::ZERO);
        assert_eq!(e.age(4), Duration::ZERO, "a clock that went back");
        assert_eq!(e.age(2_505).as_secs(), 2);
    }

    #[test]
    fn weight_is_the_bytes_held() {
        assert_eq!(plain().weight(), 10 + "application/json".len() as u64);
    }

    #[test]
    fn stream_events_are_zero_copy_slices_that_add_up() {
        let entry = stream();
        let events: Vec<Bytes> = entry.stream_events().collect();
        assert_eq!(
            events,
            [
                &b"data: {\"id\":\"c1\",\"created\":1}\n\n"[..],
                b"data: {\"id\":\"c1\",\"created\":1,\"x\":2}\n\n",
                b"data: [DONE]\n\n"
            ]
        );
        let stored = entry.body.bytes();
        let start = stored.as_ptr() as usize;
        assert_eq!(events[1].as_ptr() as usize, start + events[0].len(), "a slice of the stored bytes");
        assert_eq!(events.concat(), stored.to_vec());
        assert_eq!(plain().stream_events().count(), 0);
    }

    #[test]
    fn stream_events_with_crlf_comments_and_multi_line_data() {
        let sse = ": keep-alive\r\n\r\nevent: message\r\ndata: a\r\ndata: b\r\n\r\n\ndata: [DONE]\r\n\r\n";
        let entry = Entry::new(Body::Stream(Bytes::from_static(sse.as_bytes())), "text/event-stream", 0);
        let events: Vec<Bytes> = entry.stream_events().collect();
        assert_eq!(
            events,
            [
                &b": keep-alive\r\n\r\n"[..],
                b"event: message\r\ndata: a\r\ndata: b\r\n\r\n",
                b"\ndata: [DONE]\r\n\r\n"
            ]
        );
    }
}
