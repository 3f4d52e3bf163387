//! Who used what: every finished `/v1` request as one [`Finished`] record,
//! handed to a [`UsageSink`] (the server's usage ledger) when the answer
//! ends — for a stream, when its last event has gone to the client.
//!
//! The sink is called on the request's task, so it must not block: the
//! server's ledger pushes the record into a bounded buffer and writes it in
//! batches elsewhere.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use proxypal_limiter::Permit;

use crate::keyset::SharedClock;

/// Tokens an upstream reported for one answer (`usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// `prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `completion_tokens`.
    pub completion_tokens: Option<u64>,
    /// `total_tokens` (or prompt + completion when only those are reported).
    pub total_tokens: Option<u64>,
}

/// One finished request, as the usage ledger records it. Names only: a key
/// appears by its name or masked label, a client by its name.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Finished {
    /// When the answer ended.
    pub at: SystemTime,
    /// The named client; `None` for an operator token or an open proxy.
    pub client: Option<Arc<str>>,
    /// The model the client asked for (its public name; empty if none).
    pub model: Arc<str>,
    /// The provider of the last attempt.
    pub provider: Option<Arc<str>>,
    /// The model sent to that provider.
    pub upstream_model: Option<Arc<str>>,
    /// The key of the last attempt: its name, or its masked label when it
    /// has none ([`Key::shown`](proxypal_keypool::Key::shown)).
    pub key: Option<Arc<str>>,
    /// The status the client got.
    pub status: u16,
    /// Upstream attempts made.
    pub attempts: u8,
    /// From the request's arrival to the answer's first body byte.
    pub first_byte: Option<Duration>,
    /// From the request's arrival to the answer's end.
    pub total: Duration,
    /// An SSE stream.
    pub stream: bool,
    /// What the upstream reported (`None`: nothing reported).
    pub usage: Option<Usage>,
    /// Why it failed (`rate_limited`, `client_quota`, `model_not_allowed`,
    /// `upstream_error`, `transport_error`, `no_key`, …), or `None`.
    pub error: Option<&'static str>,
    /// The body ended normally (`false`: the client went away, or the
    /// upstream's stream broke, before the end).
    pub complete: bool,
    /// Answered from the response cache: no key, no quota, no upstream
    /// tokens.
    pub cache_hit: bool,
}

/// Longest name [`shared_name`] remembers.
const SHARED_NAME_MAX: usize = 128;
/// Names remembered per thread.
const SHARED_NAMES: usize = 8;

thread_local! {
    /// The public model names this thread recorded last (round robin).
    static RECENT_NAMES: std::cell::RefCell<(usize, [Option<Arc<str>>; SHARED_NAMES])> =
        const { std::cell::RefCell::new((0, [const { None }; SHARED_NAMES])) };
}

/// `name` as an `Arc<str>`, shared with the earlier records of this thread
/// that named it: a request's model name is copied into a new allocation
/// only when it is not among the few this thread saw last. A new `Arc` per
/// request (allocated here, freed on the ledger's writer thread) was
/// ~250 instructions of the ledger's cost per request; the writer also
/// finds a shared name by its address (`proxypal-ledger`'s name ids).
/// Names longer than [`SHARED_NAME_MAX`] bytes are not remembered.
pub(crate) fn shared_name(name: &str) -> Arc<str> {
    if name.len() > SHARED_NAME_MAX {
        return Arc::from(name);
    }
    RECENT_NAMES.with(|recent| {
        let Ok(mut recent) = recent.try_borrow_mut() else { return Arc::from(name) };
        let (next, names) = &mut *recent;
        if let Some(seen) = names.iter().flatten().find(|seen| ***seen == *name) {
            return Arc::clone(seen);
        }
        let new: Arc<str> = Arc::from(name);
        names[*next % SHARED_NAMES] = Some(Arc::clone(&new));
        *next = next.wrapping_add(1);
        new
    })
}

/// Where finished requests go (the server's usage ledger). Called on the
/// request's task: it must return at once (buffer, never block or await).
pub trait UsageSink: Send + Sync + std::fmt::Debug + 'static {
    /// Records one finished request.
    fn finished(&self, request: Finished);
}

#[derive(serde::Deserialize)]
struct Reported {
    total_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Usage {
    /// No tokens at all (an answer from the response cache).
    pub(crate) fn zero() -> Self {
        Self { prompt_tokens: Some(0), completion_tokens: Some(0), total_tokens: Some(0) }
    }
}

impl From<Reported> for Usage {
    fn from(u: Reported) -> Self {
        let total = u
            .total_tokens
            .or_else(|| Some(u.prompt_tokens?.saturating_add(u.completion_tokens.unwrap_or(0))));
        Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens, total_tokens: total }
    }
}

/// `usage` of a JSON object (OpenAI's, or Groq's `x_groq.usage`): the last
/// `"usage":` in it is read, not the whole answer (a completion's text can
/// be long; `usage` comes after it). Falls back to a full parse when the
/// quick look finds nothing it can read.
pub(crate) fn usage_of(json: &[u8]) -> Option<Usage> {
    // The last `"usage"`: found from the end by its `u`s (memrchr), which
    // cost a tenth of a reverse substring searcher on a short answer
    // (callgrind).
    let at = memchr::memrchr_iter(b'u', json)
        .find(|&i| i > 0 && json[i - 1] == b'"' && json[i..].starts_with(b"usage\""));
    if let Some(at) = at {
        if let Some(usage) = quick_usage(&json[at + b"usage\"".len()..]) {
            return Some(usage);
        }
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Reported>,
        x_groq: Option<Groq>,
    }
    #[derive(serde::Deserialize)]
    struct Groq {
        usage: Option<Reported>,
    }
    let answer: Answer = serde_json::from_slice(json).ok()?;
    answer.usage.or(answer.x_groq.and_then(|g| g.usage)).map(Usage::from)
}

/// Reads `: {"prompt_tokens": 1, …}` (what follows `"usage"`) without a
/// JSON library: the three counts as unsigned integers, every other member
/// skipped (Groq's `queue_time: 0.03`, OpenAI's `prompt_tokens_details:
/// {…}`). `None` for anything else (`null`, an escaped key, a count that is
/// not a plain integer): the caller then parses the answer properly.
/// The three counts' names are compared whole where a name starts rather
/// than searched for their end first: that halved the reader's cost on a
/// short answer (1,046 → 516 instructions, callgrind).
fn quick_usage(rest: &[u8]) -> Option<Usage> {
    let mut at = skip_space(rest, 0);
    if rest.get(at) != Some(&b':') {
        return None;
    }
    at = skip_space(rest, at + 1);
    if rest.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(rest, at + 1);
    let mut found = Reported { total_tokens: None, prompt_tokens: None, completion_tokens: None };
    if rest.get(at) == Some(&b'}') {
        return Some(found.into());
    }
    loop {
        if rest.get(at) != Some(&b'"') {
            return None;
        }
        let name = rest.get(at + 1..)?;
        // The three counts are matched whole, closing quote included (so
        // not escaped); any other name is skipped to its closing quote.
        let (slot, len) = if name.starts_with(b"prompt_tokens\"") {
            (Some(&mut found.prompt_tokens), 13)
        } else if name.starts_with(b"completion_tokens\"") {
            (Some(&mut found.completion_tokens), 17)
        } else if name.starts_with(b"total_tokens\"") {
            (Some(&mut found.total_tokens), 12)
        } else {
            let len = memchr::memchr(b'"', name)?;
            if name[..len].contains(&b'\\') {
                return None; // an escaped name
            }
            (None, len)
        };
        at = skip_space(rest, at + len + 2);
        if rest.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(rest, at + 1);
        at = match slot {
            Some(slot) => {
                let mut n: u64 = 0;
                let start = at;
                while let Some(&d) = rest.get(at).filter(|d| d.is_ascii_digit()) {
                    n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                    at += 1;
                }
                if at == start {
                    return None;
                }
                *slot = Some(n);
                at
            }
            None => skip_value(rest, at)?,
        };
        at = skip_space(rest, at);
        match rest.get(at) {
            Some(b',') => at = skip_space(rest, at + 1),
            Some(b'}') => return Some(found.into()),
            _ => return None,
        }
    }
}

fn skip_space(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The index just past the JSON value at `at` (a string, a number, a
/// literal, or an object or array with whatever nests in it); `None` if it
/// does not end within `json`.
fn skip_value(json: &[u8], at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = at;
    loop {
        match *json.get(i)? {
            b'"' => {
                i += 1;
                loop {
                    match *json.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 0 => return Some(i),
            _ => {}
        }
        i += 1;
        if depth == 0
            && !matches!(json.get(i), Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
        {
            // A scalar ends at the first byte that cannot continue it; a
            // closed object, array or string ends here.
            return Some(i);
        }
    }
}

/// The most of a plain JSON answer kept to read its `usage`.
const MAX_USAGE_BODY: usize = 1 << 20;

/// What a [`Tap`] does when the answer ends.
pub(crate) struct Settle {
    /// The key's quota permit (token windows settle with the reported use).
    pub(crate) key: Option<Permit<SharedClock>>,
    /// The client's quota permit.
    pub(crate) client: Option<Permit<SharedClock>>,
    /// The record for the ledger, completed at the end, and where it goes.
    pub(crate) record: Option<(Finished, Arc<dyn UsageSink>, tokio::time::Instant)>,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle").field("recorded", &self.record.is_some()).finish_non_exhaustive()
    }
}

impl Settle {
    /// Settles the permits with `usage` and hands the record on.
    fn done(&mut self, usage: Option<Usage>, first_byte: Option<Duration>, complete: bool) {
        let total = usage.and_then(|u| u.total_tokens);
        if let Some(permit) = self.key.take() {
            // A body cut short keeps the reservation (the upstream may have done the work).
            permit.finish(if complete { total } else { None });
        }
        if let Some(permit) = self.client.take() {
            permit.finish(if complete { total } else { None });
        }
        if let Some((mut record, sink, started)) = self.record.take() {
            record.at = SystemTime::now();
            record.total = started.elapsed();
            record.first_byte = first_byte;
            record.usage = usage;
            record.complete = complete;
            if !complete && record.error.is_none() {
                record.error = Some("incomplete");
            }
            sink.finished(record);
        }
    }
}

pin_project_lite::pin_project! {
    /// Forwards an answer untouched while reading the `usage` it reports —
    /// the JSON body's, or the last SSE event's that carries one — and
    /// settles quota permits and the ledger record with it when the body
    /// ends. A body dropped early settles as incomplete (reservations count
    /// as used).
    pub(crate) struct Tap<B> {
        #[pin]
        inner: B,
        sse: bool,
        // SSE: a partial line waiting for the next frame.
        buf: Vec<u8>,
        // JSON: the answer's frames (reference-counted, not copied).
        chunks: Vec<Bytes>,
        kept: usize,
        usage: Option<Usage>,
        first_byte: Option<Duration>,
        settle: Settle,
        // SSE: take out the usage-only chunk (ProxyPal asked for it, the client did not).
        strip: bool,
        // The inner body ended; what was held back has gone out.
        ended: bool,
        // Settled (the answer ended): a later poll changes nothing.
        settled: bool,
    }

    impl<B> PinnedDrop for Tap<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let usage = *this.usage;
            this.settle.done(usage, *this.first_byte, false);
        }
    }
}

impl<B> Tap<B> {
    pub(crate) fn new(inner: B, sse: bool, settle: Settle) -> Self {
        Self {
            inner,
            sse,
            buf: Vec::new(),
            chunks: Vec::new(),
            kept: 0,
            usage: None,
            first_byte: None,
            settle,
            strip: false,
            ended: false,
            settled: false,
        }
    }

    /// The same tap, taking out of an SSE answer the chunk that carries
    /// only `usage` (`"choices": []`): ProxyPal asked the upstream for it
    /// (`stream_options.include_usage`), the client did not. Events are
    /// passed on whole, as they complete.
    pub(crate) fn stripping_usage(mut self) -> Self {
        self.strip = self.sse;
        self
    }
}

impl<B> Tap<B> {
    fn take(self: Pin<&mut Self>, data: &Bytes) {
        let this = self.project();
        if this.first_byte.is_none() {
            *this.first_byte = this.settle.record.as_ref().map(|(_, _, started)| started.elapsed());
        }
        if !*this.sse {
            if *this.kept + data.len() <= MAX_USAGE_BODY {
                *this.kept += data.len();
                this.chunks.push(data.clone());
            }
            return;
        }
        // SSE: complete lines only; a partial line waits for the next frame.
        this.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = this.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &this.buf[start..start + end];
            if let Some(json) = line.strip_prefix(b"data:") {
                let json = json.trim_ascii();
                if json.starts_with(b"{") && json.windows(7).any(|w| w == b"\"usage\"") {
                    if let Some(usage) = usage_of(json) {
                        *this.usage = Some(usage);
                    }
                }
            }
            start += end + 1;
        }
        this.buf.drain(..start);
        if this.buf.len() > MAX_USAGE_BODY {
            this.buf.clear();
        }
    }

    /// [`finish`](Self::finish) for a JSON answer whose only frame is `data`.
    fn finish_single(self: Pin<&mut Self>, data: &Bytes) {
        let this = self.project();
        if std::mem::replace(this.settled, true) {
            return;
        }
        if this.first_byte.is_none() {
            *this.first_byte = this.settle.record.as_ref().map(|(_, _, started)| started.elapsed());
        }
        let usage = if data.len() <= MAX_USAGE_BODY { usage_of(data) } else { None };
        *this.usage = usage;
        this.settle.done(usage, *this.first_byte, true);
    }

    fn finish(self: Pin<&mut Self>) {
        let this = self.project();
        if std::mem::replace(this.settled, true) {
            return;
        }
        let usage = match (*this.sse, this.chunks.as_slice()) {
            (true, _) => *this.usage,
            (false, [one]) => usage_of(one),
            (false, many) => usage_of(&many.concat()),
        };
        *this.usage = usage;
        this.settle.done(usage, *this.first_byte, true);
    }
}

/// An SSE event's `usage`, and whether the event carries nothing else
/// (`"choices": []`): such an event is the one `include_usage` adds.
fn event_usage(event: &[u8]) -> Option<(Usage, bool)> {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    memchr::memmem::find(event, b"\"usage\"")?;
    let line = event.split(|&b| b == b'\n').find_map(|l| l.strip_prefix(b"data:"))?.trim_ascii();
    let usage = usage_of(line)?;
    let only = serde_json::from_slice::<Chunk>(line).ok()?.choices.is_some_and(|c| c.is_empty());
    Some((usage, only))
}

impl<B> Tap<B>
where
    B: Body<Data = Bytes>,
{
    /// [`Body::poll_frame`] when taking the usage-only chunk out: whole
    /// events go on; a partial one waits for the rest.
    fn poll_stripped(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            if self.ended {
                self.as_mut().finish();
                return Poll::Ready(None);
            }
            let polled = match self.as_mut().project().inner.poll_frame(cx) {
                Poll::Ready(p) => p,
                Poll::Pending => return Poll::Pending,
            };
            let data = match polled {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    let this = self.as_mut().project();
                    *this.ended = true;
                    if !this.buf.is_empty() {
                        let rest = std::mem::take(this.buf);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                    continue;
                }
            };
            let this = self.as_mut().project();
            if this.first_byte.is_none() {
                *this.first_byte = this.settle.record.as_ref().map(|(_, _, started)| started.elapsed());
            }
            this.buf.extend_from_slice(&data);
            let Some(end) = memchr::memmem::rfind(this.buf, b"\n\n").map(|i| i + 2) else { continue };
            let mut out = Vec::with_capacity(end);
            let mut start = 0;
            while let Some(i) = memchr::memmem::find(&this.buf[start..end], b"\n\n") {
                let event = &this.buf[start..start + i + 2];
                match event_usage(event) {
                    Some((usage, only)) => {
                        *this.usage = Some(usage);
                        if !only {
                            out.extend_from_slice(event);
                        }
                    }
                    None => out.extend_from_slice(event),
                }
                start += i + 2;
            }
            this.buf.drain(..end);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }
}

impl<B> Body for Tap<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.strip {
            return self.poll_stripped(cx);
        }
        let polled = self.as_mut().project().inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // hyper stops polling a body that says it has ended (a known
                // length fully sent): settle now, not at drop.
                let end = self.inner.is_end_stream();
                match frame.data_ref() {
                    // A whole JSON answer in one frame (the usual case): read
                    // where it is, without keeping a copy of the handle.
                    Some(data) if end && !self.sse && self.chunks.is_empty() => {
                        self.as_mut().finish_single(data);
                    }
                    Some(data) => {
                        self.as_mut().take(data);
                        if end {
                            self.as_mut().finish();
                        }
                    }
                    None if end => self.as_mut().finish(),
                    None => {}
                }
            }
            Poll::Ready(None) => self.as_mut().finish(),
            // A broken stream: settled as incomplete when dropped.
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.strip {
            return self.ended && self.buf.is_empty();
        }
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.strip {
            // Events may be taken out: the length is not known.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<Finished>>);

    impl UsageSink for Collect {
        fn finished(&self, request: Finished) {
            self.0.lock().unwrap().push(request);
        }
    }

    fn record() -> Finished {
        Finished {
            at: SystemTime::UNIX_EPOCH,
            client: Some(Arc::from("alice")),
            model: "llama-70b".into(),
            provider: Some("nvidia".into()),
            upstream_model: Some("meta/llama-3.3-70b-instruct".into()),
            key: Some("nvapi-…wxyz".into()),
            status: 200,
            attempts: 1,
            first_byte: None,
            total: Duration::ZERO,
            stream: true,
            usage: None,
            error: None,
            complete: false,
            cache_hit: false,
        }
    }

    fn frames(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames = parts
            .iter()
            .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(p.as_bytes()))));
        StreamBody::new(futures_util::stream::iter(frames.collect::<Vec<_>>()))
    }

    fn settle(sink: &Arc<Collect>) -> Settle {
        let sink: Arc<dyn UsageSink> = Arc::clone(sink) as Arc<dyn UsageSink>;
        Settle { key: None, client: None, record: Some((record(), sink, tokio::time::Instant::now())) }
    }

    #[tokio::test]
    async fn a_stream_records_the_usage_of_its_last_chunk_once() {
        let sink = Arc::new(Collect::default());
        let body = frames(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,",
            "\"completion_tokens\":32,\"total_tokens\":42}}\n\ndata: [DONE]\n\n",
        ]);
        let _ = Tap::new(body, true, settle(&sink)).collect().await;
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 1, "recorded once, not again at drop");
        let usage = got[0].usage.unwrap();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
            (Some(10), Some(32), Some(42))
        );
        assert!(got[0].complete && got[0].error.is_none() && got[0].first_byte.is_some());
    }

    #[tokio::test]
    async fn the_usage_chunk_proxypal_asked_for_is_taken_out_and_recorded() {
        let sink = Arc::new(Collect::default());
        let body = frames(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\nda",
            "ta: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,",
            "\"completion_tokens\":32,\"total_tokens\":42}}\n\ndata: [DONE]\n\n",
        ]);
        let out = Tap::new(body, true, settle(&sink)).stripping_usage().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n",
            "every other event, byte for byte, in order"
        );
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].usage.unwrap().total_tokens, Some(42));
        assert!(got[0].complete);
    }

    /// Frames from a queue, saying the body ended once it is empty (a known
    /// length, as hyper's bodies do): the tap settles on the last frame.
    struct Queued(std::collections::VecDeque<Bytes>);

    impl Body for Queued {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn queued(parts: &[&[u8]]) -> Queued {
        Queued(parts.iter().map(|p| Bytes::copy_from_slice(p)).collect())
    }

    #[tokio::test]
    async fn a_body_that_knows_its_end_is_read_whole_whatever_its_frames() {
        let json: &[u8] =
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        // SSE whose last `"usage"` is a later event's `null`: only a reader
        // of events keeps the real one.
        let sse: &[u8] = br#"data: {"choices":[],"usage":{"total_tokens":9}}

data: {"choices":[{"delta":{}}],"usage":null}

data: [DONE]

"#;
        let sink = Arc::new(Collect::default());
        // JSON over two frames (the usage in neither alone), SSE in one.
        let _ = Tap::new(queued(&[&json[..40], &json[40..]]), false, settle(&sink)).collect().await;
        let _ = Tap::new(queued(&[sse]), true, settle(&sink)).collect().await;
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 2, "each recorded once");
        assert_eq!(got[0].usage.and_then(|u| u.total_tokens), Some(7));
        assert_eq!(got[1].usage.and_then(|u| u.total_tokens), Some(9));
        assert!(got.iter().all(|f| f.complete));
    }

    #[tokio::test]
    async fn a_one_frame_answer_over_the_cap_is_complete_without_usage() {
        let mut json = br#"{"choices":[{"message":{"content":""#.to_vec();
        json.resize(MAX_USAGE_BODY + 1, b'x');
        json.extend_from_slice(br#""}}],"usage":{"total_tokens":5}}"#);
        let sink = Arc::new(Collect::default());
        let whole = http_body_util::Full::new(Bytes::from(json));
        let _ = Tap::new(whole, false, settle(&sink)).collect().await;
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].complete && got[0].usage.is_none(), "not read past the cap");
    }

    #[tokio::test]
    async fn a_json_answer_in_one_or_several_frames_is_recorded_once_with_its_usage() {
        let json = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let (head, tail) = json.split_at(30);
        let sink = Arc::new(Collect::default());
        // One frame of a body that knows its end (hyper's `Full`, a known
        // length), then the same answer split over a stream's frames.
        let whole = http_body_util::Full::new(Bytes::from_static(json.as_bytes()));
        let out = Tap::new(whole, false, settle(&sink)).collect().await.unwrap().to_bytes();
        assert_eq!(out, json.as_bytes());
        let out = Tap::new(frames(&[head, tail]), false, settle(&sink)).collect().await.unwrap().to_bytes();
        assert_eq!(out, json.as_bytes());
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 2, "each recorded once, not again at drop");
        for finished in got.iter() {
            let usage = finished.usage.unwrap();
            assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
                (Some(3), Some(4), Some(7))
            );
            assert!(finished.complete && finished.first_byte.is_some());
        }
    }

    #[tokio::test]
    async fn a_body_dropped_early_is_recorded_as_incomplete() {
        let sink = Arc::new(Collect::default());
        drop(Tap::new(frames(&["{\"usage\":{\"total_tokens\":7}}"]), false, settle(&sink)));
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert!(!got[0].complete);
        assert_eq!(got[0].error, Some("incomplete"));
    }

    #[test]
    fn usage_is_read_from_openai_and_groq_shapes() {
        let u = usage_of(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#).unwrap();
        assert_eq!(u.total_tokens, Some(7), "total from its parts");
        let g =
            usage_of(br#"{"x_groq":{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}}"#)
                .unwrap();
        assert_eq!(g.total_tokens, Some(3));
        assert!(usage_of(b"{}").is_none());
        let quoted = br#"{"choices":[{"message":{"content":"say \"usage\": {} please"}}],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}"#;
        assert_eq!(usage_of(quoted).unwrap().total_tokens, Some(11), "the last usage, not the text's");
        assert_eq!(usage_of(br#"{"usage":null}"#), None);
    }

    #[test]
    fn the_quick_reader_agrees_with_a_full_parse() {
        let full = |json: &[u8]| {
            let v: serde_json::Value = serde_json::from_slice(json).unwrap();
            let u = v.get("usage").or_else(|| v.get("x_groq").and_then(|g| g.get("usage")))?;
            let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
            Some(
                Reported {
                    prompt_tokens: n("prompt_tokens"),
                    completion_tokens: n("completion_tokens"),
                    total_tokens: n("total_tokens"),
                }
                .into(),
            )
        };
        let cases: &[&[u8]] = &[
            br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#,
            br#"{"usage" : { "prompt_tokens" : 1 , "total_tokens":2 } }"#,
            // Groq: decimals beside the counts.
            br#"{"usage":{"queue_time":0.037,"prompt_tokens":18,"prompt_time":0.0012,"completion_tokens":7,"completion_time":0.02,"total_tokens":25,"total_time":0.021}}"#,
            // OpenAI: nested details, strings with escapes and brackets.
            br#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":0,"audio":[1,{"a":"}\"]"}]},"completion_tokens":3,"total_tokens":12}}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":0}}"#,
            // Not a plain integer: the full parse decides (serde reads 1e3 as no u64).
            br#"{"usage":{"prompt_tokens":5,"completion_tokens":2.0}}"#,
            br#"{"choices":[{"text":"\"usage\": {\"total_tokens\": 1}"}],"usage":{"total_tokens":3}}"#,
            // Escaped member names: the full parse reads them.
            br#"{"usage":{"prompt\u005ftokens":5,"completion_tokens":1}}"#,
            br#"{"usage":{"a\"b":1,"total_tokens":2}}"#,
        ];
        for json in cases {
            let text = std::str::from_utf8(json).unwrap();
            let quick = usage_of(json);
            let expected: Option<Usage> = full(json);
            if text.contains("2.0") {
                // serde's u64 refuses 2.0: the quick reader must not invent a count either.
                assert_eq!(quick, None, "{text}");
            } else {
                assert_eq!(quick, expected, "{text}");
            }
        }
    }

    #[test]
    fn skipping_values_finds_their_ends() {
        for (json, end) in [
            (&b"12,"[..], 2),
            (b"-0.5e+3}", 7),
            (b"\"a\\\"b\",", 6),
            (b"{\"a\":[1,{\"b\":\"]\"}]},", 19),
            (b"true}", 4),
            (b"null", 4),
        ] {
            assert_eq!(skip_value(json, 0), Some(end), "{}", String::from_utf8_lossy(json));
        }
        assert_eq!(skip_value(b"{\"a\":1", 0), None, "an object that does not close");
        assert_eq!(skip_value(b"\"open", 0), None);
    }

    #[test]
    fn shared_names_are_the_same_allocation_and_the_same_text() {
        let a = shared_name("meta/llama-3.1-8b-instruct");
        let b = shared_name(&String::from("meta/llama-3.1-8b-instruct"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*shared_name("other"), "other");
        for i in 0..3 * SHARED_NAMES {
            assert_eq!(&*shared_name(&format!("model-{i}")), format!("model-{i}"));
        }
        let c = shared_name("meta/llama-3.1-8b-instruct");
        assert_eq!(&*c, "meta/llama-3.1-8b-instruct", "forgotten, made anew");
        let long = "x".repeat(SHARED_NAME_MAX + 1);
        assert!(!Arc::ptr_eq(&shared_name(&long), &shared_name(&long)), "long names are not kept");
        assert_eq!(&*shared_name(""), "");
    }
}
