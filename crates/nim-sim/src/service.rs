//! Request handling: routing, auth, rate limiting, faults and the responses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::chat::{Answer, Plan, ToolCall, argument_pieces, cut_pieces, text_pieces};
use crate::fault::{
    FORBIDDEN_BODY, Fault, RATE_LIMITED_BODY, UNAUTHORIZED_BODY, not_found_detail, problem_json,
};
use crate::mask_key;
use crate::state::{LimitInfo, LimitStatus, Outcome, Shared, Slot};

/// Error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body type of the simulator.
pub(crate) type SimBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest request body the simulator reads.
const MAX_REQUEST_BODY: usize = 32 << 20;
/// `created` timestamp of listed models (2025-01-01T00:00:00Z).
const MODEL_CREATED: u64 = 1_735_689_600;
/// Dimension of the simulated embedding vectors.
const EMBEDDING_DIM: usize = 16;
/// Bytes written by the [`Fault::Garbage`] fault.
pub(crate) const GARBAGE: &[u8] = b"this is not http\r\n\r\n";

/// What the connection task must do instead of serving hyper further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnAction {
    /// Close the socket without a response.
    Drop,
    /// Write [`GARBAGE`] on the raw socket, then close it.
    Garbage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Models,
    Chat,
    Embeddings,
}

/// How a streamed chat completion ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamEnd {
    /// Final chunk, optional usage chunk, `[DONE]`.
    Done { include_usage: bool },
    /// Silence until the client goes away.
    Stall,
    /// Abort the body with an error.
    Break,
}

/// Handles one request. Never fails: every problem becomes a response, and
/// connection-level faults are signalled through `ctl` (this future then
/// never completes; the connection task drops it).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    ctl: mpsc::UnboundedSender<ConnAction>,
    req: Request<Incoming>,
) -> Response<SimBody> {
    let (parts, body) = req.into_parts();
    let key = bearer(&parts.headers).or_else(|| shared.config.anonymous.then(|| "anonymous".to_owned()));
    let key = key.as_deref();

    // Always read the whole request body so a keep-alive connection stays
    // reusable whatever we answer.
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                &format!("could not read the request body: {e}"),
            );
        }
    };

    let fault = shared.arrive(key, &parts.headers);
    if !body.is_empty() {
        shared.record_body(&body);
    }

    if !shared.config.response_delay.is_zero() {
        tokio::time::sleep(shared.config.response_delay).await;
    }

    match fault {
        None => {}
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Status { status, content_type, headers, body }) => {
            return fault_response(status, content_type.as_deref(), &headers, body);
        }
        Some(Fault::DropConnection) => return abort_connection(&ctl, ConnAction::Drop).await,
        Some(Fault::Garbage) => return abort_connection(&ctl, ConnAction::Garbage).await,
        Some(Fault::StallMidStream { after_chunks }) => {
            let model = request_model(&body);
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let content = StreamContent::Text { pieces: content_pieces(key, after_chunks), stop: None };
            return stream_response(&shared, id, &model, 0, content, StreamEnd::Stall, None).0;
        }
        Some(Fault::BreakMidStream { after_chunks }) => {
            let model = request_model(&body);
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let content = StreamContent::Text { pieces: content_pieces(key, after_chunks), stop: None };
            return stream_response(&shared, id, &model, 0, content, StreamEnd::Break, None).0;
        }
    }

    let route = match route(&parts.method, parts.uri.path()) {
        Ok(r) => r,
        Err(p) => {
            shared.count(key, Outcome::Other);
            return p.into_response();
        }
    };

    // Authentication.
    let Some(key) = key else {
        return json_response(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY.into());
    };
    if shared.forbidden_keys.contains(key) {
        shared.count(Some(key), Outcome::Unauthorized);
        return json_response(StatusCode::FORBIDDEN, FORBIDDEN_BODY.into());
    }
    if !shared.accepted_keys.is_empty() && !shared.accepted_keys.contains(key) {
        shared.count(Some(key), Outcome::Unauthorized);
        return json_response(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY.into());
    }

    if route == Route::Models {
        let resp = models(&shared);
        shared.count(Some(key), Outcome::Ok);
        return resp;
    }

    // Limits (POST endpoints only): concurrency, request limits, tokens.
    let mut slot = match shared.admit(key) {
        Ok(slot) => Some(slot),
        Err(info) => return rate_limited(&shared, info, &body),
    };
    if !shared.config.processing_delay.is_zero() {
        tokio::time::sleep(shared.config.processing_delay).await;
    }

    let answer = match route {
        Route::Chat => chat(&shared, key, &body, &mut slot),
        _ => embeddings(&shared, &body),
    };
    let (mut resp, tokens) = answer.unwrap_or_else(|p| (p.into_response(), 0));
    let info = shared.finish(key, tokens);
    add_dialect_headers(&shared, resp.headers_mut(), &info);
    // A plain answer is no longer in flight once produced (a stream took the
    // slot along).
    drop(slot);
    let outcome = if resp.status().is_success() { Outcome::Ok } else { Outcome::Other };
    shared.count(Some(key), outcome);
    resp
}

/// Asks the connection task to abort, then waits forever (the connection
/// task drops this future).
async fn abort_connection(ctl: &mpsc::UnboundedSender<ConnAction>, action: ConnAction) -> Response<SimBody> {
    // If the connection task is gone there is nobody to answer anyway.
    let _ = ctl.send(action);
    std::future::pending().await
}

/// The `Authorization: Bearer <token>` token, if any.
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// An error answered with a problem-details JSON body.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
    allow: Option<&'static str>,
}

impl Problem {
    fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, title, detail: detail.into(), allow: None }
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", detail)
    }

    fn into_response(self) -> Response<SimBody> {
        let mut resp = problem(self.status, self.title, &self.detail);
        if let Some(allow) = self.allow {
            resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

fn route(method: &Method, path: &str) -> Result<Route, Problem> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let (route, allowed) = match path {
        "/v1/models" => (Route::Models, "GET"),
        "/v1/chat/completions" => (Route::Chat, "POST"),
        "/v1/embeddings" => (Route::Embeddings, "POST"),
        _ => {
            return Err(Problem::new(StatusCode::NOT_FOUND, "Not Found", format!("no route for {path}")));
        }
    };
    if method.as_str() == allowed {
        Ok(route)
    } else {
        let mut p = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            format!("{method} is not allowed on {path}"),
        );
        p.allow = Some(allowed);
        Err(p)
    }
}

fn full(body: impl Into<Bytes>) -> SimBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed_unsync()
}

fn empty() -> SimBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

fn json_response(status: StatusCode, body: String) -> Response<SimBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response<SimBody> {
    json_response(status, problem_json(status.as_u16(), title, detail))
}

fn rate_limited(shared: &Shared, info: LimitInfo, body: &[u8]) -> Response<SimBody> {
    use crate::SimDialect;
    let wait = info.requests.as_ref().and_then(|r| r.reset).unwrap_or(Duration::from_secs(1));
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let model = request_model(body);
    let text = match shared.config.dialect {
        SimDialect::Nvidia => RATE_LIMITED_BODY.to_owned(),
        SimDialect::Groq => {
            let limit = info.requests.as_ref().map_or(0, |r| r.limit);
            json!({"error": {
                "message": format!("Rate limit reached for model `{model}` in organization `org_sim` service tier `on_demand` on requests per minute (RPM): Limit {limit}, Used {limit}, Requested 1. Please try again in {}.", go_duration(wait)),
                "type": "requests",
                "code": "rate_limit_exceeded",
            }})
            .to_string()
        }
        SimDialect::Cerebras => json!({
            "message": "Requests per minute limit exceeded - too many requests sent.",
            "type": "too_many_requests_error",
            "param": "quota",
            "code": "request_quota_exceeded",
        })
        .to_string(),
        SimDialect::OpenRouter => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let reset_ms = now_ms + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            let limit = info.requests.as_ref().map_or(0, |r| r.limit);
            json!({"error": {
                "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day",
                "code": 429,
                "metadata": {
                    "headers": {"X-RateLimit-Limit": limit.to_string(), "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset_ms.to_string()},
                    "limit_source": "openrouter_free_tier_daily",
                },
            }, "user_id": "user_sim"})
            .to_string()
        }
        SimDialect::Gemini => json!([{"error": {
            "code": 429,
            "message": format!("You exceeded your current quota, please check your plan and billing details. Please retry in {}s.", wait.as_secs_f64()),
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"model": model, "location": "global"},
                }]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{secs}s")},
            ],
        }}])
        .to_string(),
    };
    let mut resp = json_response(StatusCode::TOO_MANY_REQUESTS, text);
    let retry_after = match shared.config.dialect {
        SimDialect::Groq => Some(Duration::from_secs(secs)),
        _ => shared.config.retry_after,
    };
    if let Some(ra) = retry_after {
        let secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    add_dialect_headers(shared, resp.headers_mut(), &info);
    resp
}

/// The limit headers of an answer, as the played provider writes them.
fn add_dialect_headers(shared: &Shared, headers: &mut http::HeaderMap, info: &LimitInfo) {
    use crate::SimDialect;
    match shared.config.dialect {
        SimDialect::Nvidia | SimDialect::Groq => add_limit_headers(headers, info),
        SimDialect::Cerebras => {
            let mut add = |unit: &str, status: &Option<LimitStatus>| {
                let Some(st) = status else { return };
                let reset = st.reset.map_or(0.0, |d| d.as_secs_f64());
                for (field, value) in [
                    ("limit", st.limit.to_string()),
                    ("remaining", st.remaining.to_string()),
                    ("reset", reset.to_string()),
                ] {
                    let name = format!("x-ratelimit-{field}-{unit}-minute");
                    if let (Ok(n), Ok(v)) =
                        (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value))
                    {
                        headers.insert(n, v);
                    }
                }
            };
            add("requests", &info.requests);
            add("tokens", &info.tokens);
        }
        SimDialect::OpenRouter | SimDialect::Gemini => {}
    }
}

/// Adds the `x-ratelimit-*` headers `info` describes (none if empty).
fn add_limit_headers(headers: &mut http::HeaderMap, info: &LimitInfo) {
    let mut add = |unit: &str, status: &Option<LimitStatus>| {
        let Some(st) = status else { return };
        let mut put = |field: &str, value: String| {
            let name = format!("x-ratelimit-{field}-{unit}");
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                headers.insert(n, v);
            }
        };
        put("limit", st.limit.to_string());
        put("remaining", st.remaining.to_string());
        if let Some(reset) = st.reset {
            put("reset", go_duration(reset));
        }
    };
    add("requests", &info.requests);
    add("tokens", &info.tokens);
}

/// `d` rounded up to the millisecond, written like Go's
/// `time.Duration.String()`: `0s`, `185ms`, `7.66s`, `1m26.4s`, `1h0m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&s.to_string());
    if frac > 0 {
        let digits = format!("{frac:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

fn fault_response(
    status: u16,
    content_type: Option<&str>,
    headers: &[(String, String)],
    body: String,
) -> Response<SimBody> {
    let mut resp = Response::new(if body.is_empty() { empty() } else { full(body) });
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(c).ok()) {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn models(shared: &Shared) -> Response<SimBody> {
    let data: Vec<Value> = shared
        .config
        .models
        .iter()
        .map(|id| {
            let owner = id.split_once('/').map_or("nvidia", |(o, _)| o);
            json!({"id": id, "object": "model", "created": MODEL_CREATED, "owned_by": owner})
        })
        .collect();
    json_response(StatusCode::OK, json!({"object": "list", "data": data}).to_string())
}

/// Parses a JSON object request body.
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Problem> {
    if body.is_empty() {
        return Err(Problem::bad_request("request body is empty; expected a JSON object"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Problem::bad_request("request body must be a JSON object")),
        Err(e) => Err(Problem::bad_request(format!("invalid JSON: {e}"))),
    }
}

/// The required string `model` field (400 if missing, 404 if unknown in
/// strict mode).
fn model_of(shared: &Shared, req: &serde_json::Map<String, Value>) -> Result<String, Problem> {
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        return Err(Problem::bad_request("field 'model' is required and must be a string"));
    };
    if shared.config.strict_models && !shared.config.models.iter().any(|m| m == model) {
        return Err(Problem::new(StatusCode::NOT_FOUND, "Not Found", not_found_detail()));
    }
    Ok(model.to_owned())
}

/// Best-effort model name for fault streams.
fn request_model(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "meta/llama-3.1-8b-instruct".to_owned())
}

fn greeting(key: Option<&str>) -> String {
    match key {
        Some(k) => format!("Hello from the simulated NIM (key {})", mask_key(k)),
        None => "Hello from the simulated NIM".to_owned(),
    }
}

/// Answers a chat completion; returns the response and the tokens it used
/// (`usage.total_tokens`). A stream takes `slot` along, to release it when
/// its body ends. What it answers: see the crate docs, "Chat completion
/// answers".
fn chat(
    shared: &Arc<Shared>,
    key: &str,
    body: &[u8],
    slot: &mut Option<Slot>,
) -> Result<(Response<SimBody>, u64), Problem> {
    let req = parse_object(body)?;
    let model = model_of(shared, &req)?;
    if !req.get("messages").is_some_and(Value::is_array) {
        return Err(Problem::bad_request("field 'messages' is required and must be an array"));
    }
    let plan = Plan::from_request(&req).map_err(Problem::bad_request)?;
    let prompt_tokens = plan.prompt_tokens(body.len());
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let answer = plan.answer(id, greeting(Some(key)));
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage =
            req.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool)
                == Some(true);
        let content = match answer {
            Answer::ToolCalls(calls) => StreamContent::ToolCalls(calls),
            Answer::Text(text) => {
                let pieces = text_pieces(&text, shared.config.stream_chunks);
                let streamed = pieces.concat();
                match plan.stop_match(&streamed) {
                    Some((at, stop)) => {
                        StreamContent::Text { pieces: cut_pieces(pieces, at), stop: Some(stop) }
                    }
                    None => StreamContent::Text { pieces, stop: None },
                }
            }
        };
        return Ok(stream_response(
            shared,
            id,
            &model,
            prompt_tokens,
            content,
            StreamEnd::Done { include_usage },
            slot.take(),
        ));
    }
    let (message, finish, stop, completion_tokens) = match answer {
        Answer::ToolCalls(calls) => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
            let tokens = calls.iter().map(|c| 1 + argument_pieces(&c.arguments).len() as u64).sum();
            let message = json!({"role": "assistant", "content": null, "tool_calls": tool_calls});
            (message, "tool_calls", None, tokens)
        }
        Answer::Text(mut text) => {
            let stop = plan.stop_match(&text).map(|(at, stop)| {
                text.truncate(at);
                stop
            });
            let tokens = text.split_whitespace().count() as u64;
            (json!({"role": "assistant", "content": text}), "stop", stop, tokens)
        }
    };
    let completion_tokens = shared.config.completion_tokens.unwrap_or(completion_tokens);
    let mut choice = json!({
        "index": 0,
        "message": message,
        "logprobs": null,
        "finish_reason": finish,
    });
    if let Some(stop) = stop {
        choice["stop_reason"] = Value::String(stop);
    }
    let body = json!({
        "id": format!("chatcmpl-sim-{id}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    });
    Ok((json_response(StatusCode::OK, body.to_string()), prompt_tokens + completion_tokens))
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The greeting followed by filler words, in `n` pieces.
fn content_pieces(key: Option<&str>, n: usize) -> Vec<String> {
    text_pieces(&greeting(key), n)
}

/// What a stream carries before its end.
enum StreamContent {
    /// Content pieces, one per chunk (the first with the role), and the stop
    /// string that cut them, if one did.
    Text { pieces: Vec<String>, stop: Option<String> },
    /// Tool calls, streamed as a role chunk, then every call's header, then
    /// the argument fragments, interleaved.
    ToolCalls(Vec<ToolCall>),
}

/// One step of a simulated stream.
enum Step {
    Emit {
        delay: Duration,
        data: Bytes,
    },
    Stall,
    /// Wait (so hyper flushes what was sent), then fail the body.
    Break {
        delay: Duration,
    },
}

/// Decrements `active_streams`, and frees the request's concurrency slot (if
/// any), when the streaming body ends or is dropped.
struct StreamGuard {
    shared: Arc<Shared>,
    /// Held only to be dropped with the guard.
    _slot: Option<Slot>,
}

impl StreamGuard {
    fn new(shared: &Arc<Shared>, slot: Option<Slot>) -> Self {
        shared.active_streams.fetch_add(1, Ordering::SeqCst);
        Self { shared: Arc::clone(shared), _slot: slot }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared.active_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A streamed chat completion `chatcmpl-sim-<id>` and the tokens it uses
/// (prompt + completion, whether or not the usage chunk is sent).
fn stream_response(
    shared: &Arc<Shared>,
    id: u64,
    model: &str,
    prompt_tokens: u64,
    content: StreamContent,
    end: StreamEnd,
    slot: Option<Slot>,
) -> (Response<SimBody>, u64) {
    let cfg = &shared.config;
    let id = format!("chatcmpl-sim-{id}");
    let created = unix_now();
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };

    let mut deltas = Vec::new();
    let (finish, stop) = match content {
        StreamContent::Text { pieces, stop } => {
            for (i, piece) in pieces.into_iter().enumerate() {
                deltas.push(if i == 0 {
                    json!({"role": "assistant", "content": piece})
                } else {
                    json!({"content": piece})
                });
            }
            ("stop", stop)
        }
        StreamContent::ToolCalls(calls) => {
            deltas.push(json!({"role": "assistant", "content": ""}));
            for (i, c) in calls.iter().enumerate() {
                deltas.push(json!({"tool_calls": [{
                    "index": i, "id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": ""},
                }]}));
            }
            let fragments: Vec<Vec<&str>> = calls.iter().map(|c| argument_pieces(&c.arguments)).collect();
            let rounds = fragments.iter().map(Vec::len).max().unwrap_or(0);
            for round in 0..rounds {
                for (i, f) in fragments.iter().enumerate() {
                    if let Some(piece) = f.get(round) {
                        deltas.push(json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}));
                    }
                }
            }
            ("tool_calls", None)
        }
    };
    // Text: the chunks with content; tool calls: every chunk after the role.
    let produced = match finish {
        "stop" => deltas.iter().filter(|d| d["content"].as_str().is_some_and(|c| !c.is_empty())).count(),
        _ => deltas.len().saturating_sub(1),
    };
    let completion_tokens = cfg.completion_tokens.unwrap_or(produced as u64);
    let mut steps = Vec::with_capacity(deltas.len() + 3);
    for (i, delta) in deltas.into_iter().enumerate() {
        let delay = if i == 0 { cfg.first_chunk_delay } else { cfg.chunk_interval };
        steps.push(Step::Emit { delay, data: sse(&chunk(delta, Value::Null)) });
    }
    match end {
        StreamEnd::Done { include_usage } => {
            let delay = if steps.is_empty() { cfg.first_chunk_delay } else { Duration::ZERO };
            let mut last = chunk(json!({}), json!(finish));
            if let Some(stop) = stop {
                last["choices"][0]["stop_reason"] = Value::String(stop);
            }
            steps.push(Step::Emit { delay, data: sse(&last) });
            if include_usage {
                let u = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage(prompt_tokens, completion_tokens),
                });
                steps.push(Step::Emit { delay: Duration::ZERO, data: sse(&u) });
            }
            steps.push(Step::Emit { delay: Duration::ZERO, data: Bytes::from_static(b"data: [DONE]\n\n") });
        }
        StreamEnd::Stall => steps.push(Step::Stall),
        StreamEnd::Break => steps.push(Step::Break {
            // Never zero: the body must return `Pending` once so hyper flushes
            // the chunks already produced before the error tears it down.
            delay: cfg.chunk_interval.max(Duration::from_millis(1)),
        }),
    }

    let guard = StreamGuard::new(shared, slot);
    let frames = futures_util::stream::unfold((steps.into_iter(), guard), |(mut steps, guard)| async move {
        match steps.next()? {
            Step::Emit { delay, data } => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok(Frame::data(data)), (steps, guard)))
            }
            Step::Stall => {
                std::future::pending::<()>().await;
                None
            }
            Step::Break { delay } => {
                tokio::time::sleep(delay).await;
                let err: BoxError = "simulated mid-stream connection break".into();
                Some((Err(err), (steps, guard)))
            }
        }
    });

    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (resp, prompt_tokens + completion_tokens)
}

/// Answers an embeddings request; returns the response and the tokens it
/// used (`usage.total_tokens`).
fn embeddings(shared: &Shared, body: &[u8]) -> Result<(Response<SimBody>, u64), Problem> {
    let req = parse_object(body)?;
    let model = model_of(shared, &req)?;
    let bad = |detail: &str| Err(Problem::bad_request(detail));
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        // A single token array is one input.
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => {
            vec![Value::Array(a.clone()).to_string()]
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            let mut out = Vec::with_capacity(a.len());
            for item in a {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    Value::Array(_) => out.push(item.to_string()),
                    _ => return bad("field 'input' items must be strings or token arrays"),
                }
            }
            out
        }
        Some(Value::Array(_)) => return bad("field 'input' must not be empty"),
        _ => return bad("field 'input' is required (a string or an array)"),
    };
    let mut tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += (text.chars().count() as u64 / 4).max(1);
            json!({"object": "embedding", "index": i, "embedding": embed(text)})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok((json_response(StatusCode::OK, body.to_string()), tokens))
}

/// A deterministic unit vector derived from the text.
fn embed(text: &str) -> Vec<f32> {
    // FNV-1a of the text seeds a splitmix64 sequence.
    let mut seed = text
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let raw: Vec<f32> = (0..EMBEDDING_DIM)
        .map(|_| {
            let v = crate::splitmix64(&mut seed);
            // Top 24 bits → [-1, 1).
            ((v >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::EPSILON);
    raw.iter().map(|x| x / norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_concatenate_to_greeting() {
        let k = Some("nvapi-sim-abcdefgh1234");
        for n in 1..12 {
            let p = content_pieces(k, n);
            assert_eq!(p.len(), n);
            assert!(p.concat().starts_with(&greeting(k)));
        }
        assert!(content_pieces(k, 0).is_empty());
    }

    #[test]
    fn bearer_parsing() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer  abc "));
        assert_eq!(bearer(&h).as_deref(), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer xyz"));
        assert_eq!(bearer(&h).as_deref(), Some("xyz"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(go_duration(ms(185)), "185ms");
        assert_eq!(go_duration(Duration::from_micros(184_001)), "185ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(7660)), "7.66s");
        assert_eq!(go_duration(ms(7605)), "7.605s");
        assert_eq!(go_duration(ms(86_400)), "1m26.4s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(3723) + ms(500)), "1h2m3.5s");
    }

    #[test]
    fn limit_headers_are_written_per_unit() {
        let mut h = http::HeaderMap::new();
        add_limit_headers(&mut h, &LimitInfo::default());
        assert!(h.is_empty());
        let info = LimitInfo {
            requests: Some(LimitStatus { limit: 40, remaining: 0, reset: Some(Duration::from_millis(1500)) }),
            tokens: Some(LimitStatus { limit: 1000, remaining: 990, reset: None }),
        };
        add_limit_headers(&mut h, &info);
        assert_eq!(h["x-ratelimit-limit-requests"], "40");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.5s");
        assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "990");
        // A limit that never restores announces no reset.
        assert!(h.get("x-ratelimit-reset-tokens").is_none());
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn prompt_tokens_are_a_quarter_of_the_body_bytes() {
        let plan = Plan::from_request(&serde_json::Map::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.prompt_tokens(0), 0);
        assert_eq!(plan.prompt_tokens(3), 0);
        assert_eq!(plan.prompt_tokens(403), 100);
    }

    #[test]
    fn embeddings_are_unit_and_deterministic() {
        let a = embed("hello");
        assert_eq!(a.len(), EMBEDDING_DIM);
        assert_eq!(a, embed("hello"));
        assert_ne!(a, embed("hellp"));
        let n: f32 = a.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }
}
