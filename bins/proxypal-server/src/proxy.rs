//! `/v1/*`: forward to the upstream with the next key that has capacity, fail
//! over before the client sees anything, stream the answer back untouched.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use proxypal_keypool::Outcome;
use proxypal_upstream::{RequestParts, Upstream, UpstreamError};
use tokio::sync::OwnedSemaphorePermit;

use crate::app::{App, Lease, NoKey};
use crate::body::{Guarded, ProxyBody};
use crate::errors::{error_response, json_response, rewrite_upstream_error};
use crate::metrics::{AttemptResult, KeyMetrics, StreamGuard};

/// Upper bound of `retry.max_attempts` (the config validation's limit).
pub(crate) const MAX_ATTEMPTS: usize = crate::config::MAX_ATTEMPTS_LIMIT as usize;

/// The most of an upstream error body read to rewrite it.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// How long reading an upstream error body may take.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// `Retry-After` the OpenAI SDKs all honour (older Python and Node ignore ≥ 60 s).
const MAX_RETRY_AFTER_SECS: u64 = 60;

/// What an upstream answer means for the key and for failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Success or an error that is not the key's: goes back to the client.
    Deliver,
    /// 429: the key rests, try another.
    RateLimited,
    /// 401/403: the key is disabled, try another.
    KeyRejected,
    /// 5xx: maybe the key's or the node's; read the body to tell.
    ServerError,
}

fn verdict(status: StatusCode) -> Verdict {
    match status.as_u16() {
        429 => Verdict::RateLimited,
        401 | 403 => Verdict::KeyRejected,
        500..=599 => Verdict::ServerError,
        _ => Verdict::Deliver,
    }
}

/// NVIDIA failures that are the model's (shared by every key), not the key's:
/// switching keys would not help and the key must not be punished.
fn is_model_failure(body: &[u8]) -> bool {
    const MARKERS: [&[u8]; 2] = [b"Worker local total request limit", b"DEGRADED function"];
    MARKERS.iter().any(|m| body.windows(m.len()).any(|w| w == *m))
}

/// Parses `Retry-After` (seconds) or `retry-after-ms`.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let ms = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    ms.or_else(|| {
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

/// The last failed attempt, kept to answer the client if all attempts fail.
enum Failure {
    Upstream { status: StatusCode, headers: http::HeaderMap, body: Bytes, key_rejected: bool },
    Transport(UpstreamError),
}

impl Failure {
    /// Why the attempt failed, as a metrics label.
    fn result(&self) -> AttemptResult {
        match self {
            Failure::Transport(_) => AttemptResult::TransportError,
            Failure::Upstream { key_rejected: true, .. } => AttemptResult::KeyRejected,
            Failure::Upstream { status, .. } if status.as_u16() == 429 => AttemptResult::RateLimited,
            Failure::Upstream { .. } => AttemptResult::ServerError,
        }
    }
}

async fn read_error_body(body: proxypal_upstream::UpstreamBody) -> Bytes {
    let collect = Limited::new(body, MAX_ERROR_BODY).collect();
    match tokio::time::timeout(ERROR_BODY_TIMEOUT, collect).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    }
}

/// Serves one `/v1/*` request through `upstream` (the serving worker's
/// client). `rest` is the path and query after `/v1`.
pub async fn forward(
    app: &App,
    upstream: &Upstream,
    req: Request<Incoming>,
    rest: String,
    slot: OwnedSemaphorePermit,
) -> Response<ProxyBody> {
    let started = tokio::time::Instant::now();
    // Time not spent in the proxy itself: queueing and waiting for upstream headers.
    let mut elsewhere = Duration::ZERO;
    let mut served_by = None;
    let resp = attempts(app, upstream, req, rest, slot, &mut elsewhere, &mut served_by).await;
    served_by.as_ref().unwrap_or(app.metrics().no_key()).request(resp.status());
    app.metrics().overhead(started.elapsed().saturating_sub(elsewhere));
    resp
}

async fn attempts(
    app: &App,
    upstream: &Upstream,
    req: Request<Incoming>,
    rest: String,
    slot: OwnedSemaphorePermit,
    elsewhere: &mut Duration,
    served_by: &mut Option<Arc<KeyMetrics>>,
) -> Response<ProxyBody> {
    let settings = app.settings();
    let (mut head, body) = req.into_parts();

    // Client authentication (the token is never forwarded: the upstream client
    // replaces Authorization with the key).
    if settings.tokens.required() {
        let presented = head
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !settings.tokens.accepts(presented) {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or invalid client token: send Authorization: Bearer <token> (your ProxyPal token, not an NVIDIA key)",
            );
        }
    }
    head.headers.remove(AUTHORIZATION);

    // The body is buffered (bounded) so it can be replayed on another key.
    let max = settings.max_body_bytes;
    let declared =
        head.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large(max);
    }
    let body = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return too_large(max),
        Err(e) => {
            tracing::debug!(error = %e, "client body read failed");
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request_body",
                "could not read the request body",
            );
        }
    };
    // For the failover log lines: they carry the id themselves, so the
    // per-request span can stay at debug level (free when debug is off).
    let request_id = head.headers.get(crate::serve::REQUEST_ID).cloned();
    let id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-");
    let parts = RequestParts::new(head.method, rest, head.headers);

    let deadline = tokio::time::Instant::now() + settings.queue_timeout;
    let max_attempts = settings.max_attempts;
    drop(settings);
    // Keys tried by this request, on the stack: no allocation per request.
    let mut tried_keys = [0usize; MAX_ATTEMPTS];
    let mut tried_len = 0usize;
    let mut last: Option<Failure> = None;

    while tried_len < max_attempts {
        let tried = &tried_keys[..tried_len];
        let queued_at = tokio::time::Instant::now();
        let leased = app.lease(tried, deadline).await;
        let queued = queued_at.elapsed();
        *elsewhere += queued;
        app.metrics().queue_wait(queued);
        let lease = match leased {
            Ok(lease) => lease,
            Err(no_key) => {
                return match last {
                    // The last key this request tried was just disabled and none is left.
                    Some(Failure::Upstream { key_rejected: true, .. }) if no_key == NoKey::AllDisabled => {
                        no_key_response(no_key)
                    }
                    Some(failure) => failed(failure),
                    None => no_key_response(no_key),
                };
            }
        };
        let Lease { selected, auth, metrics } = lease;
        if let Some(previous) = &last {
            app.metrics().retry(previous.result());
        }
        tried_keys[tried_len] = selected.index();
        tried_len += 1;
        let label = selected.key().label();
        tracing::Span::current().record("key", label);
        *served_by = Some(Arc::clone(&metrics));
        let sent_at = tokio::time::Instant::now();
        let answer = upstream.send(&parts, body.clone(), &auth).await;
        let upstream_took = sent_at.elapsed();
        *elsewhere += upstream_took;
        app.metrics().upstream_latency(upstream_took);
        match answer {
            Err(e) => {
                metrics.attempt(AttemptResult::TransportError);
                tracing::warn!(id, key = label, error = %e, "upstream attempt failed; failing over");
                app.pool().report(&selected, Outcome::Transient);
                last = Some(Failure::Transport(e));
            }
            Ok(resp) => {
                let status = resp.status();
                match verdict(status) {
                    Verdict::Deliver => {
                        app.pool().report(&selected, Outcome::Success);
                        let result = if status.is_client_error() {
                            AttemptResult::ClientError
                        } else {
                            AttemptResult::Ok
                        };
                        metrics.attempt(result);
                        return deliver(app, resp, slot).await;
                    }
                    Verdict::RateLimited => {
                        let after = retry_after(resp.headers());
                        tracing::info!(id, key = label, retry_after = ?after, "upstream rate limited the key; failing over");
                        app.pool().report(&selected, Outcome::RateLimited { retry_after: after });
                        metrics.attempt(AttemptResult::RateLimited);
                        last = Some(Box::pin(failure(resp, false)).await);
                    }
                    Verdict::KeyRejected => {
                        tracing::warn!(
                            id,
                            key = label,
                            status = status.as_u16(),
                            "upstream rejected the key; disabling it"
                        );
                        app.pool().report(&selected, Outcome::AuthFailed);
                        metrics.attempt(AttemptResult::KeyRejected);
                        last = Some(Box::pin(failure(resp, true)).await);
                    }
                    Verdict::ServerError => {
                        let failed = Box::pin(failure(resp, false)).await;
                        if let Failure::Upstream { body, .. } = &failed {
                            if is_model_failure(body) {
                                // The model's failure, not the key's: no penalty, no failover.
                                app.pool().report(&selected, Outcome::Success);
                                metrics.attempt(AttemptResult::ModelError);
                                return self::failed(failed);
                            }
                        }
                        tracing::warn!(
                            id,
                            key = label,
                            status = status.as_u16(),
                            "upstream error; failing over"
                        );
                        app.pool().report(&selected, Outcome::Transient);
                        metrics.attempt(AttemptResult::ServerError);
                        last = Some(failed);
                    }
                }
            }
        }
    }
    match last {
        Some(Failure::Upstream { key_rejected: true, .. }) if app.pool().time_to_usable().is_none() => {
            no_key_response(NoKey::AllDisabled)
        }
        Some(failure) => failed(failure),
        None => no_key_response(NoKey::NoKeys),
    }
}

/// Reads an upstream error answer. Callers box this future: error answers are the exception,
/// and unboxed it would enlarge every request's future (moved on each `.await` nesting).
async fn failure(resp: Response<proxypal_upstream::UpstreamBody>, key_rejected: bool) -> Failure {
    let (head, body) = resp.into_parts();
    Failure::Upstream {
        status: head.status,
        headers: head.headers,
        body: read_error_body(body).await,
        key_rejected,
    }
}

/// Streams a response to the client, frame by frame.
async fn deliver(
    app: &App,
    resp: Response<proxypal_upstream::UpstreamBody>,
    slot: OwnedSemaphorePermit,
) -> Response<ProxyBody> {
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        // The client's (or the model's) error: rewrite it into the OpenAI shape if needed.
        let failed = Box::pin(failure(resp, false)).await;
        return self::failed(failed);
    }
    let streaming =
        resp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let stream = streaming.then(|| StreamGuard::new(app.metrics().open_streams()));
    resp.map(|body| Guarded::new(body.map_err(Into::into), (slot, stream)).boxed())
}

/// Answers with the last upstream failure (rewritten) or a proxy error.
fn failed(failure: Failure) -> Response<ProxyBody> {
    match failure {
        Failure::Upstream { key_rejected: true, status, .. } => error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_key_rejected",
            format!(
                "the upstream rejected the API key(s) tried ({} {}); the keys were disabled — check them and reload",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        ),
        Failure::Upstream { status, headers, body, .. } => {
            let mut resp = match rewrite_upstream_error(status, &body) {
                Some(rewritten) => json_response(status, &rewritten),
                None => {
                    let mut r = Response::new(crate::body::full(body));
                    *r.status_mut() = status;
                    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    r
                }
            };
            // Keep the upstream's timing hints.
            for name in [RETRY_AFTER, HeaderName::from_static("retry-after-ms")] {
                if let Some(v) = headers.get(&name) {
                    resp.headers_mut().insert(name, v.clone());
                }
            }
            resp
        }
        Failure::Transport(e) if e.is_timeout() => error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("the upstream did not answer in time: {e}"),
        ),
        Failure::Transport(e) => error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            format!("the upstream failed: {e}"),
        ),
    }
}

fn too_large(max: usize) -> Response<ProxyBody> {
    let mut resp = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!("the request body is larger than limits.max_body_bytes ({max} bytes)"),
    );
    // We did not read the rest; the connection cannot be reused.
    resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Whole seconds for `Retry-After`: at least 1, at most 60.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).clamp(1, u128::from(MAX_RETRY_AFTER_SECS)) as u64
}

fn no_key_response(no_key: NoKey) -> Response<ProxyBody> {
    match no_key {
        NoKey::QueueTimeout { wait } => {
            let secs = retry_after_secs(wait);
            let mut resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "all_keys_rate_limited",
                format!("all API keys are rate limited; the next permit is in {:.1} s", wait.as_secs_f64()),
            );
            let h = resp.headers_mut();
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
            h.insert(HeaderName::from_static("retry-after-ms"), HeaderValue::from(secs * 1000));
            resp
        }
        NoKey::AllDisabled => {
            let mut resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "all_keys_disabled",
                "every API key is disabled because the upstream rejected it (401/403); fix the keys and reload",
            );
            resp.headers_mut()
                .insert(HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"));
            resp
        }
        NoKey::AllTried | NoKey::NoKeys => {
            let mut resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_keys",
                "no API key is configured or usable for this request",
            );
            resp.headers_mut()
                .insert(HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_between_1_and_60() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(600)), 60);
    }

    #[test]
    fn model_failures_are_recognised() {
        assert!(is_model_failure(br#"{"detail":"Worker local total request limit reached (8/8)"}"#));
        assert!(is_model_failure(b"Function id 'x': DEGRADED function cannot be invoked"));
        assert!(!is_model_failure(b"internal error"));
    }

    #[test]
    fn retry_after_headers_parse() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
    }
}
