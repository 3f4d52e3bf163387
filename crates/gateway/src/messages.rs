//! Anthropic's Messages API in front of the chat pipeline: `POST
//! /v1/messages` and `POST /v1/messages/count_tokens`.
//!
//! A Messages request is translated into a chat completion request
//! (`proxypal-anthropic`) and served by the same pipeline as an OpenAI
//! client's (`failover::forward`): the same client tokens and quotas,
//! routing (glob aliases catch Claude Code's model names), failover, ledger
//! and response cache. The answer is translated back: a plain message, or
//! Anthropic's events produced chunk by chunk as the upstream's arrive. An
//! error is answered in Anthropic's shape, with `retry-after` kept; an error
//! after a stream started is an `error` event that ends it.
//!
//! The client's token comes as `x-api-key` (Anthropic's SDKs) or
//! `Authorization: Bearer`; `anthropic-version` and `anthropic-beta` are
//! accepted and never sent upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use proxypal_anthropic::{
    ApiError, ErrorKind, MessagesRequest, Options, StreamTranslator, TokenCount, TranslateError,
};

use crate::body::{BoxError, ProxyBody};
use crate::failover::Shared;
use crate::route::Route;

/// `POST /v1/messages`.
pub(crate) const MESSAGES: &str = "/v1/messages";
/// `POST /v1/messages/count_tokens`.
pub(crate) const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// The most of a plain upstream answer read to translate it.
const MAX_ANSWER: usize = 64 << 20;
/// The most of an upstream error answer read to translate it.
const MAX_ERROR: usize = 64 << 10;

/// Whether `path` is served here.
pub(crate) fn is_messages(path: &str) -> bool {
    path == MESSAGES || path == COUNT_TOKENS
}

/// Serves one Messages API request.
pub(crate) async fn serve<B>(gw: Shared<'_>, req: Request<B>) -> Response<ProxyBody>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (mut head, body) = req.into_parts();
    let spare = take_api_key(&mut head.headers);
    if let Some(refused) = refusal(gw, &mut head, spare) {
        return refused;
    }
    let max = gw.settings.load().max_body_bytes;
    let body = match read(body, max).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let (upstream, reply) = match plan(gw, head, &body) {
        Plan::Answer(resp) => return resp,
        Plan::Forward { upstream, reply } => (upstream, reply),
    };
    let resp = crate::failover::forward(gw, upstream).await;
    answer(resp, reply).await
}

/// The answer when the request's method or token will not do.
/// `spare`: an `x-api-key` sent beside an `Authorization` header, tried when
/// that one does not authenticate.
fn refusal(
    gw: Shared<'_>,
    head: &mut http::request::Parts,
    spare: Option<HeaderValue>,
) -> Option<Response<ProxyBody>> {
    if head.method != Method::POST {
        let mut resp =
            error(ApiError::new(ErrorKind::InvalidRequest, format!("{} takes POST", head.uri.path())), 405);
        resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return Some(resp);
    }
    let settings = gw.settings.load();
    let declared = head.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body_bytes as u64) {
        let max = settings.max_body_bytes;
        return Some(error(
            ApiError::new(ErrorKind::InvalidRequest, format!("request body larger than {max} bytes")),
            413,
        ));
    }
    let mut known = settings.tokens.authenticate(&head.headers).is_some();
    if let (false, Some(bearer)) = (known, spare) {
        head.headers.insert(AUTHORIZATION, bearer);
        known = settings.tokens.authenticate(&head.headers).is_some();
    }
    if !known {
        return Some(error(
            ApiError::new(
                ErrorKind::Authentication,
                "missing or invalid client token: send x-api-key: <token> or Authorization: Bearer <token> (your ProxyPal token, not an upstream key)",
            ),
            401,
        ));
    }
    None
}

/// What to do with a request whose body was read.
enum Plan {
    /// Answered here (an error, or `count_tokens`).
    Answer(Response<ProxyBody>),
    /// Sent through the chat pipeline, then translated back.
    Forward { upstream: Request<Full<Bytes>>, reply: Reply },
}

/// What the answer is translated with.
struct Reply {
    /// The model the client asked for (the answer's `model`).
    model: String,
    /// The client asked for a stream.
    stream: bool,
    /// The request's estimated input tokens: `message_start`'s usage when
    /// the upstream reports none in the stream (Claude Code sizes its
    /// context from it).
    input_tokens: u64,
}

/// Reads and translates the request (or answers `count_tokens`).
fn plan(gw: Shared<'_>, mut head: http::request::Parts, body: &[u8]) -> Plan {
    let request = match MessagesRequest::from_slice(body) {
        Ok(request) => request,
        Err(e) => return Plan::Answer(translate_error(&e)),
    };
    if head.uri.path() == COUNT_TOKENS {
        let count = TokenCount { input_tokens: proxypal_anthropic::estimate_tokens(&request) };
        return Plan::Answer(json_response(StatusCode::OK, serde_json::to_vec(&count).unwrap_or_default()));
    }
    let model = request.model.clone();
    let stream = request.is_stream();
    let input_tokens = proxypal_anthropic::estimate_tokens(&request);
    let settings = gw.settings.load();
    let options = options_for(gw, &settings, &model);
    let translation = match proxypal_anthropic::to_chat(request, &options) {
        Ok(t) => t,
        Err(e) => return Plan::Answer(translate_error(&e)),
    };
    if !translation.dropped.is_empty() {
        let dropped: Vec<String> = translation.dropped.iter().map(ToString::to_string).collect();
        tracing::debug!(?dropped, "messages: fields the upstream does not take");
    }
    let chat = match serde_json::to_vec(&translation.chat) {
        Ok(chat) => Bytes::from(chat),
        Err(e) => {
            return Plan::Answer(error(
                ApiError::new(ErrorKind::Api, format!("translating the request: {e}")),
                500,
            ));
        }
    };
    head.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    head.headers.insert(CONTENT_LENGTH, HeaderValue::from(chat.len()));
    head.uri = http::Uri::from_static("/v1/chat/completions");
    // The answer is translated, so it must arrive as bytes ProxyPal can read.
    head.headers.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    head.extensions.insert(crate::failover::KeepUsage);
    Plan::Forward {
        upstream: Request::from_parts(head, Full::new(chat)),
        reply: Reply { model, stream, input_tokens },
    }
}

/// The pipeline's answer in Anthropic's terms.
async fn answer(resp: Response<ProxyBody>, reply: Reply) -> Response<ProxyBody> {
    let Reply { model, stream, input_tokens } = reply;
    if resp.status() != StatusCode::OK {
        return upstream_error(resp).await;
    }
    let sse =
        resp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if stream && sse {
        let (mut parts, body) = resp.into_parts();
        keep_headers(&mut parts.headers);
        parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        parts.headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let events = Events::new(body, StreamTranslator::new(&model).with_input_tokens(input_tokens));
        return Response::from_parts(parts, events.boxed());
    }
    let (mut parts, body) = resp.into_parts();
    let answer = match collect(body, MAX_ANSWER).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return error(
                ApiError::new(ErrorKind::Api, format!("the upstream's answer broke off: {e}")),
                502,
            );
        }
    };
    keep_headers(&mut parts.headers);
    if sse {
        // Asked for a plain answer, sent a stream: not translated.
        return error(
            ApiError::new(ErrorKind::Api, "the upstream streamed an answer to a plain request"),
            502,
        );
    }
    let mut resp = if stream {
        // Asked for a stream, answered whole (an upstream that ignores
        // `stream`): the answer as one chunk through the translator.
        let mut out = Vec::new();
        let mut translator = StreamTranslator::new(&model).with_input_tokens(input_tokens);
        let pushed = chunk_of(&answer).map(|chunk| translator.push_into(&chunk, &mut out));
        if !matches!(pushed, Some(Ok(()))) {
            return error(ApiError::new(ErrorKind::Api, "the upstream's answer could not be read"), 502);
        }
        translator.finish_into(&mut out);
        let mut resp = Response::new(crate::body::full(out));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        resp
    } else {
        let message = proxypal_anthropic::from_chat(&answer, &model).and_then(|m| {
            serde_json::to_vec(&m).map_err(|e| TranslateError::InvalidResponse { reason: e.to_string() })
        });
        match message {
            Ok(json) => json_response(StatusCode::OK, json),
            // An `error` object in a 200 (some upstreams): its own kind and status.
            Err(e @ TranslateError::Upstream { .. }) => return translate_error(&e),
            Err(e) => {
                return error(
                    ApiError::new(ErrorKind::Api, format!("the upstream's answer could not be read: {e}")),
                    502,
                );
            }
        }
    };
    for (name, value) in &parts.headers {
        resp.headers_mut().append(name, value.clone());
    }
    resp
}

/// A whole chat completion as one streamed chunk: `choices[0].message` as
/// its `delta` (tool calls numbered), with the finish reason and usage.
fn chunk_of(answer: &[u8]) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let choice = value.get_mut("choices")?.get_mut(0)?;
    let mut message = choice.get_mut("message")?.take();
    if let Some(calls) = message.get_mut("tool_calls").and_then(serde_json::Value::as_array_mut) {
        for (i, call) in calls.iter_mut().enumerate() {
            if let Some(call) = call.as_object_mut() {
                call.insert("index".into(), i.into());
            }
        }
    }
    let choice = choice.as_object_mut()?;
    choice.remove("message");
    choice.insert("delta".into(), message);
    serde_json::to_vec(&value).ok()
}

/// What the request's targets accept (`top_k` only where every provider the
/// route may use speaks NVIDIA's dialect).
fn options_for(gw: Shared<'_>, settings: &crate::config::Settings, model: &str) -> Options {
    let providers = &settings.providers[..];
    let listed = |provider: &str, model: &str| gw.catalogs.lists(provider, model);
    let route = settings.routes.resolve(Some(model), providers, &listed);
    let targets = match &route {
        Route::Alias(alias) => &alias.targets[..],
        Route::Direct(target) => std::slice::from_ref(target),
    };
    let all = |f: &dyn Fn(&crate::provider::Provider) -> bool| {
        targets.iter().all(|t| providers.get(t.provider).is_some_and(|p| f(p)))
    };
    // `top_k`: NVIDIA's NIM (vLLM) takes it; other chat APIs reject or ignore it.
    let top_k = all(&|p| p.dialect == crate::dialect::Dialect::Nvidia);
    // Usage in streams is asked for per provider by the pipeline (KeepUsage), so
    // a route mixing providers that take `stream_options` with ones that do not
    // gets it from the former.
    Options::new().with_top_k(top_k)
}

/// `x-api-key` becomes the bearer token the pipeline reads; when an
/// `Authorization` header came too, that one stays and the key's bearer is
/// returned, to try if it does not authenticate. Anthropic's own headers are
/// not forwarded.
fn take_api_key(headers: &mut HeaderMap) -> Option<HeaderValue> {
    headers.remove(ANTHROPIC_VERSION);
    headers.remove(ANTHROPIC_BETA);
    let key = headers.remove(X_API_KEY)?;
    let mut bearer = Vec::with_capacity(key.len() + 7);
    bearer.extend_from_slice(b"Bearer ");
    bearer.extend_from_slice(key.as_bytes());
    let mut value = HeaderValue::from_bytes(&bearer).ok()?;
    value.set_sensitive(true);
    if headers.contains_key(AUTHORIZATION) {
        return Some(value);
    }
    headers.insert(AUTHORIZATION, value);
    None
}

/// Keeps what an Anthropic client may use of the pipeline's headers (rate
/// limits, `retry-after`, ProxyPal's own); drops the body's length and type.
fn keep_headers(headers: &mut HeaderMap) {
    for name in BODY_HEADERS {
        headers.remove(name);
    }
}

/// What describes the upstream's body, not the translated one.
const BODY_HEADERS: [HeaderName; 9] = [
    CONTENT_LENGTH,
    CONTENT_TYPE,
    http::header::TRANSFER_ENCODING,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    http::header::ETAG,
    HeaderName::from_static("content-md5"),
    HeaderName::from_static("digest"),
    HeaderName::from_static("content-digest"),
];

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// A pipeline answer's body, at most `max` bytes. Not `Limited`: its
/// `Into<BoxError>` bound over the boxed body's `dyn Error` makes the
/// handler's future fail rustc's higher-ranked `Send` check.
async fn collect(mut body: ProxyBody, max: usize) -> Result<Bytes, BoxError> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if out.len() + data.len() > max {
                return Err(format!("an answer larger than {max} bytes").into());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// The client's body, at most `max` bytes.
async fn read<B>(body: B, max: usize) -> Result<Bytes, Response<ProxyBody>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(error(
            ApiError::new(ErrorKind::InvalidRequest, format!("request body larger than {max} bytes")),
            413,
        )),
        Err(_) => {
            Err(error(ApiError::new(ErrorKind::InvalidRequest, "the request body could not be read"), 400))
        }
    }
}

/// An error from the pipeline (OpenAI-shaped, or an upstream's), in
/// Anthropic's shape with its status and headers (`retry-after`, rate
/// limits) kept.
async fn upstream_error(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let bytes = collect(body, MAX_ERROR).await.unwrap_or_default();
    let api = ApiError::from_openai_body(parts.status.as_u16(), &bytes);
    keep_headers(&mut parts.headers);
    parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, crate::body::full(api.to_json()))
}

/// A translation error as the client's error (400 for its request, 502 for
/// an upstream's answer).
fn translate_error(e: &TranslateError) -> Response<ProxyBody> {
    let api = e.to_api_error();
    let status = api.kind.status();
    error(api, status)
}

/// `api` as a response with `status`.
fn error(api: ApiError, status: u16) -> Response<ProxyBody> {
    let mut resp = json_response(StatusCode::OK, api.to_json().to_vec());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

fn json_response(status: StatusCode, json: Vec<u8>) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::body::full(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The payload of an SSE `data:` line (without the field name and one
/// leading space, and without a trailing `\r`).
fn data_of(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"data:")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

pin_project_lite::pin_project! {
    /// An upstream chat stream as Anthropic's events, translated as each
    /// chunk arrives (lines split across frames are joined first, then an
    /// event's `data:` lines, as SSE defines).
    struct Events {
        #[pin]
        inner: ProxyBody,
        translator: StreamTranslator,
        // Bytes of an unfinished line.
        partial: BytesMut,
        // The current event's `data:` lines, joined by `\n`.
        data: Data,
        done: bool,
    }
}

/// What one payload did.
enum Step {
    /// Translated (or nothing to translate): go on.
    Go,
    /// The upstream reported an error (sent on as an `error` event): end.
    End,
    /// Not a chunk; nothing was written.
    NotAChunk(TranslateError),
}

/// The `data:` lines of the SSE event being read.
#[derive(Default)]
struct Data {
    joined: Vec<u8>,
    lines: usize,
}

impl Events {
    fn new(inner: ProxyBody, translator: StreamTranslator) -> Self {
        Self { inner, translator, partial: BytesMut::new(), data: Data::default(), done: false }
    }
}

impl Events {
    /// Reads one SSE line (without its `\n`): a `data:` line joins the
    /// event, a blank line ends it and translates it into `out`, other
    /// fields (`event:`, `id:`, comments) are ignored. `false` when the
    /// stream is to end (the upstream reported an error).
    fn line(translator: &mut StreamTranslator, data: &mut Data, line: &[u8], out: &mut Vec<u8>) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Self::dispatch(translator, data, out);
        }
        let Some(payload) = data_of(line) else { return true };
        if data.lines > 0 {
            data.joined.push(b'\n');
        }
        data.joined.extend_from_slice(payload);
        data.lines += 1;
        true
    }

    /// Translates the event read so far, if any. An event of several
    /// `data:` lines is one payload (SSE joins them with `\n`: JSON
    /// pretty-printed over lines); if that payload is not a chunk, each
    /// line is tried on its own (an upstream that leaves out the blank
    /// line between events). `false` when the stream is to end.
    fn dispatch(translator: &mut StreamTranslator, data: &mut Data, out: &mut Vec<u8>) -> bool {
        let lines = std::mem::take(&mut data.lines);
        let joined = &data.joined;
        let go_on = match lines {
            0 => true,
            1 => Self::chunk(translator, joined, out),
            _ => match Self::payload(translator, joined, out) {
                Step::Go => true,
                Step::End => false,
                Step::NotAChunk(_) => {
                    joined.split(|&b| b == b'\n').all(|line| Self::chunk(translator, line, out))
                }
            },
        };
        // The buffer is kept for the next event (no allocation per event).
        data.joined.clear();
        go_on
    }

    /// [`payload`](Self::payload), a payload that is not a chunk skipped
    /// (logged); `false` when the stream is to end.
    fn chunk(translator: &mut StreamTranslator, payload: &[u8], out: &mut Vec<u8>) -> bool {
        match Self::payload(translator, payload, out) {
            Step::Go => true,
            Step::End => false,
            Step::NotAChunk(e) => {
                tracing::debug!(error = %e, "messages: an upstream chunk skipped");
                true
            }
        }
    }

    /// Translates one event's payload into `out`.
    fn payload(translator: &mut StreamTranslator, payload: &[u8], out: &mut Vec<u8>) -> Step {
        if payload == b"[DONE]" {
            translator.finish_into(out);
            return Step::Go;
        }
        match translator.push_into(payload, out) {
            Ok(()) => Step::Go,
            // The upstream said it failed: say so, and end.
            Err(e @ TranslateError::Upstream { .. }) => {
                out.extend_from_slice(&e.to_api_error().to_event());
                Step::End
            }
            // Nothing was written and the translator is unchanged.
            Err(e) => Step::NotAChunk(e),
        }
    }

    /// How the stream ends when the upstream's does (or breaks off): the
    /// closing events if the answer was complete, else an `error` event.
    fn end(translator: &mut StreamTranslator, out: &mut Vec<u8>, broke: bool) {
        if translator.is_finished() {
            return;
        }
        if translator.finish_reason().is_some() {
            // Complete, without `[DONE]` (or broken off after the last chunk).
            translator.finish_into(out);
            return;
        }
        let why = if broke {
            "the upstream stream broke off before the answer was complete"
        } else {
            "the upstream stream ended before the answer was complete"
        };
        out.extend_from_slice(&proxypal_anthropic::error_event(ErrorKind::Api, why));
    }
}

/// The longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 16 << 20;

impl Body for Events {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let this = self.as_mut().project();
            if *this.done {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            match this.inner.poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    // Only the new bytes can hold the line's end.
                    let mut from = this.partial.len();
                    this.partial.extend_from_slice(&data);
                    while let Some(at) =
                        this.partial[from..].iter().position(|&b| b == b'\n').map(|i| from + i)
                    {
                        let line = this.partial.split_to(at + 1);
                        from = 0;
                        if !Self::line(this.translator, this.data, &line[..at], &mut out) {
                            *this.done = true;
                            break;
                        }
                    }
                    if this.partial.len() > MAX_LINE {
                        tracing::warn!(
                            bytes = this.partial.len(),
                            "messages: an upstream line too long; stream ended"
                        );
                        out.extend_from_slice(&proxypal_anthropic::error_event(
                            ErrorKind::Api,
                            "the upstream sent a line too long to translate",
                        ));
                        *this.done = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "messages: the upstream stream broke off");
                    *this.done = true;
                    // What arrived whole before the break still counts.
                    if Self::dispatch(this.translator, this.data, &mut out) {
                        Self::end(this.translator, &mut out, true);
                    }
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    // A last line without its newline, a last event without its blank line.
                    let rest = std::mem::take(this.partial);
                    if (rest.is_empty() || Self::line(this.translator, this.data, &rest, &mut out))
                        && Self::dispatch(this.translator, this.data, &mut out)
                    {
                        Self::end(this.translator, &mut out, false);
                    }
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    const FINISH: &str = r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;

    /// What `Events` makes of upstream `frames`, then `Err` when `broken`.
    async fn output(frames: &[&str], broken: bool) -> String {
        let mut items: Vec<Result<Frame<Bytes>, BoxError>> =
            frames.iter().map(|f| Ok(Frame::data(Bytes::from(f.to_string())))).collect();
        if broken {
            items.push(Err("reset".into()));
        }
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(items)).boxed();
        let out = Events::new(body, StreamTranslator::new("m")).collect().await.unwrap().to_bytes();
        String::from_utf8(out.to_vec()).unwrap()
    }

    /// The event names of [`output`].
    async fn events(frames: &[&str], broken: bool) -> Vec<String> {
        output(frames, broken)
            .await
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .map(str::to_owned)
            .collect()
    }

    /// The text of every `text_delta` in `out`, in order.
    fn text_of(out: &str) -> String {
        out.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .filter(|e| e["delta"]["type"] == "text_delta")
            .map(|e| e["delta"]["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn an_events_data_lines_are_joined_and_its_other_fields_ignored() {
        // One chunk pretty-printed over three `data:` lines with CRLF, beside a
        // comment, an `event:` and an `id:` field; split mid-line across frames.
        let first = ": keep-alive\r\nevent: chunk\r\nid: 7\r\ndata: {\"id\":\"c\",\r\ndata:  \"choi";
        let rest = "ces\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\"joined\"}}]}\r\n\r\n";
        let out = output(&[first, rest, &format!("data: {FINISH}\n\n")], false).await;
        assert_eq!(text_of(&out), "joined", "{out}");
        assert!(out.trim_end().ends_with(r#"{"type":"message_stop"}"#), "{out}");
        assert!(!out.contains("event: error"), "{out}");
    }

    #[tokio::test]
    async fn events_without_a_blank_line_between_them_are_each_translated() {
        let out =
            output(&[&format!("data: {TEXT}\ndata: {TEXT}\ndata: {FINISH}\ndata: [DONE]\n\n")], false).await;
        assert_eq!(text_of(&out), "hihi", "{out}");
        assert_eq!(out.matches("event: message_stop").count(), 1, "{out}");
        assert!(!out.contains("event: error"), "{out}");
    }

    #[tokio::test]
    async fn an_upstream_error_over_several_data_lines_ends_the_stream_once() {
        let error = "data: {\"error\":{\"message\":\"slow down\",\ndata: \"type\":\"rate_limit_error\",\"code\":429}}\n\n";
        let out = output(&[&format!("data: {TEXT}\n\n{error}data: {FINISH}\n\n")], false).await;
        assert_eq!(out.matches("event: error").count(), 1, "{out}");
        assert!(out.contains("rate_limit_error"), "{out}");
        assert!(!out.contains("message_stop"), "nothing after the error: {out}");
    }

    #[tokio::test]
    async fn lines_split_across_frames_and_a_last_line_without_newline_are_translated() {
        let first = format!("data: {TEXT}\n\nda");
        let rest = format!("ta: {FINISH}");
        let got = events(&[&first, &rest], false).await;
        assert_eq!(got.last().map(String::as_str), Some("message_stop"), "{got:?}");
        assert!(!got.contains(&"error".to_owned()), "{got:?}");
    }

    #[tokio::test]
    async fn a_break_after_the_answer_is_complete_is_no_error() {
        let got = events(&[&format!("data: {TEXT}\n\ndata: {FINISH}\n\n")], true).await;
        assert_eq!(got.last().map(String::as_str), Some("message_stop"), "{got:?}");
        let got = events(&[&format!("data: {TEXT}\n\ndata: {FINISH}\n\ndata: [DONE]\n\n")], true).await;
        assert_eq!(got.iter().filter(|e| *e == "message_stop").count(), 1, "{got:?}");
        assert!(!got.contains(&"error".to_owned()), "{got:?}");
    }

    #[tokio::test]
    async fn a_break_before_the_end_is_an_error_event_and_no_message_stop() {
        let got = events(&[&format!("data: {TEXT}\n\n")], true).await;
        assert_eq!(got.last().map(String::as_str), Some("error"), "{got:?}");
        assert!(!got.contains(&"message_stop".to_owned()));
        let got = events(&[&format!("data: {TEXT}\n\n")], false).await;
        assert_eq!(got.last().map(String::as_str), Some("error"), "ended early: {got:?}");
    }

    #[tokio::test]
    async fn an_error_chunk_from_the_upstream_ends_the_stream_with_its_kind() {
        let error = r#"data: {"error":{"message":"slow down","type":"rate_limit_error","code":429}}"#;
        let got = events(&[&format!("data: {TEXT}\n\n{error}\n\ndata: {FINISH}\n\n")], false).await;
        assert_eq!(got.last().map(String::as_str), Some("error"), "{got:?}");
        assert!(!got.contains(&"message_stop".to_owned()), "nothing after the error: {got:?}");
    }
}
