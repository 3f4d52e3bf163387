//! The gateway's own answers, all in the OpenAI error shape: no key, an
//! upstream failure passed back (with the upstream's end-to-end headers), a
//! request the gateway refuses.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use proxypal_upstream::UpstreamError;

use crate::body::{ProxyBody, full};
use crate::lease::NoKey;
use crate::openai::{error_response, rewrite_upstream_error};
use proxypal_limiter::Cause;

/// `Retry-After` the OpenAI SDKs all honour (older Python and Node ignore ≥ 60 s).
const MAX_RETRY_AFTER_SECS: u64 = 60;

/// `retry-after-ms`, OpenAI's millisecond hint.
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `x-should-retry: false` tells the OpenAI SDKs not to retry.
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Whole seconds for `Retry-After`: at least 1, at most 60.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).clamp(1, u128::from(MAX_RETRY_AFTER_SECS)) as u64
}

/// An upstream error answer: the head and the (bounded) body read from it.
#[derive(Debug)]
pub(crate) struct UpstreamAnswer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Headers that describe the bytes of a body, not the message: they go when
/// the gateway writes a new body in place of the upstream's.
const BODY_HEADERS: [&str; 6] =
    ["content-encoding", "content-range", "etag", "content-md5", "digest", "content-digest"];

/// Passes an upstream error back to the client: rewritten into the OpenAI
/// shape when it is not in it already, with every end-to-end header the
/// upstream sent (request ids, `x-ratelimit-*`, `Retry-After`, provider
/// headers; hop-by-hop ones were dropped by the upstream client). Only
/// `Content-Length` and, when the body is rewritten, `Content-Type` and the
/// headers that describe the old body's bytes (`Content-Encoding`, `ETag`,
/// digests) change. (The server's front then sets `x-request-id` to its own
/// request id, as on every response.)
pub(crate) fn upstream_error(answer: UpstreamAnswer) -> Response<ProxyBody> {
    let UpstreamAnswer { status, mut headers, body } = answer;
    let body = match rewrite_upstream_error(status, &body) {
        Some(rewritten) => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            for name in BODY_HEADERS {
                headers.remove(name);
            }
            Bytes::from(serde_json::to_vec(&rewritten).unwrap_or_default())
        }
        None => {
            headers.entry(CONTENT_TYPE).or_insert(HeaderValue::from_static("application/json"));
            body
        }
    };
    // The body may be shorter than the upstream's (cut at the read limit) or rewritten:
    // hyper sets the length of the body sent.
    headers.remove(CONTENT_LENGTH);
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Every key tried was rejected by the upstream (401/403).
pub(crate) fn keys_rejected(status: StatusCode) -> Response<ProxyBody> {
    error_response(
        StatusCode::BAD_GATEWAY,
        "upstream_key_rejected",
        format!(
            "the upstream rejected the API key(s) tried ({} {}); the keys were disabled — check them and reload",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
    )
}

/// The last attempt got no answer.
pub(crate) fn transport(error: &UpstreamError) -> Response<ProxyBody> {
    if error.is_timeout() {
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("the upstream did not answer in time: {error}"),
        )
    } else {
        error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            format!("the upstream failed: {error}"),
        )
    }
}

/// A named client's request refused before it reached the pool: a model
/// off its list (403), or its own quota spent (429 with `Retry-After`, a
/// body that says the limit is the client's, not the pool's).
pub(crate) fn refused(refusal: crate::clients::Refusal) -> Response<ProxyBody> {
    match refusal {
        crate::clients::Refusal::Model { client, model } => error_response(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("client {client:?} may not use model {model:?}: it is not on the client's `models` list"),
        ),
        crate::clients::Refusal::Quota { client, wait, limit } => {
            let secs = retry_after_secs(wait);
            let message = format!(
                "client {client:?} is over its own quota ({limit}); the next request is allowed in {:.1} s. This is the client's limit, not the pool's",
                wait.as_secs_f64()
            );
            let body = serde_json::json!({"error": {
                "message": message, "type": "rate_limit_error", "param": null,
                "code": "client_quota_exceeded", "client": &*client,
            }});
            let mut resp = crate::openai::json_response(StatusCode::TOO_MANY_REQUESTS, &body);
            let h = resp.headers_mut();
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
            h.insert(RETRY_AFTER_MS, HeaderValue::from(secs * 1000));
            resp
        }
    }
}

/// No key could be leased.
pub(crate) fn no_key(no_key: NoKey) -> Response<ProxyBody> {
    match no_key {
        NoKey::QueueTimeout { wait, cause } => {
            let secs = retry_after_secs(wait);
            let mut resp = match spent(wait, cause) {
                Some(body) => crate::openai::json_response(StatusCode::TOO_MANY_REQUESTS, &body),
                None => error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "all_keys_rate_limited",
                    format!(
                        "all API keys are rate limited; the next permit is in {:.1} s",
                        wait.as_secs_f64()
                    ),
                ),
            };
            let h = resp.headers_mut();
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
            h.insert(RETRY_AFTER_MS, HeaderValue::from(secs * 1000));
            resp
        }
        NoKey::AllDisabled => unavailable(
            "all_keys_disabled",
            "every API key is disabled because the upstream rejected it (401/403); fix the keys and reload",
        ),
        NoKey::AllTried | NoKey::NoKeys => {
            unavailable("no_keys", "no API key is configured or usable for this request")
        }
    }
}

/// The body for a pool whose windows are spent for longer than a request
/// may wait: which limit, and when it resets (`resets_at`, RFC 3339).
fn spent(wait: Duration, cause: Cause) -> Option<serde_json::Value> {
    let Cause::Window { unit, limit, period, daily } = cause else { return None };
    let resets_at = std::time::SystemTime::now()
        .checked_add(wait)
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())?;
    let window = match (period.as_secs(), daily) {
        (86_400, true) => "day (fixed reset)".to_owned(),
        (86_400, false) => "rolling day".to_owned(),
        (60, _) => "rolling minute".to_owned(),
        (secs, _) => format!("rolling {secs} s"),
    };
    let code = if period.as_secs() >= 3_600 { "quota_exhausted" } else { "all_keys_rate_limited" };
    let message = format!(
        "every usable API key has spent its {} per {window} (limit {limit}); the next one is allowed at {resets_at}",
        unit.as_str()
    );
    Some(serde_json::json!({"error": {
        "message": message, "type": "rate_limit_error", "param": null, "code": code,
        "limit": {"kind": unit.as_str(), "period_seconds": period.as_secs(), "limit": limit},
        "resets_at": resets_at,
    }}))
}

/// 503 that retrying will not fix: `x-should-retry: false` tells the SDKs so.
fn unavailable(code: &str, message: &str) -> Response<ProxyBody> {
    let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, code, message);
    resp.headers_mut().insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    resp
}

/// The request body is over the limit.
pub(crate) fn too_large(max: usize) -> Response<ProxyBody> {
    let mut resp = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!("the request body is larger than limits.max_body_bytes ({max} bytes)"),
    );
    // We did not read the rest; the connection cannot be reused.
    resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The request body could not be read.
pub(crate) fn unreadable_body() -> Response<ProxyBody> {
    error_response(StatusCode::BAD_REQUEST, "bad_request_body", "could not read the request body")
}

/// The client token is missing or wrong.
pub fn unauthorized(message: &str) -> Response<ProxyBody> {
    error_response(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
}

/// Every in-flight slot is taken.
pub(crate) fn overloaded() -> Response<ProxyBody> {
    let mut resp = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "the proxy is at limits.max_inflight requests; retry shortly",
    );
    resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// A path the gateway does not serve.
pub fn not_found(path: &str) -> Response<ProxyBody> {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {path}: the OpenAI-compatible API is under /v1 (e.g. /v1/chat/completions)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn retry_after_is_whole_seconds_between_1_and_60() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(600)), 60);
    }

    async fn body_of(resp: Response<ProxyBody>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn upstream_headers(content_type: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("upstream-req-1"));
        h.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("0"));
        h.insert("nvcf-reqid", HeaderValue::from_static("abc"));
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert("etag", HeaderValue::from_static("\"v1\""));
        h
    }

    #[tokio::test]
    async fn a_rewritten_error_keeps_the_upstreams_end_to_end_headers() {
        let resp = upstream_error(UpstreamAnswer {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            headers: upstream_headers("application/problem+json"),
            body: Bytes::from_static(br#"{"status":422,"title":"Unprocessable","detail":"bad field"}"#),
        });
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let h = resp.headers();
        assert_eq!(h["x-request-id"], "upstream-req-1");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["nvcf-reqid"], "abc");
        assert_eq!(h[RETRY_AFTER], "3");
        assert_eq!(h[CONTENT_TYPE], "application/json", "the body changed shape, so its type did");
        assert!(h.get(CONTENT_LENGTH).is_none(), "the upstream's length is not the rewritten body's");
        assert!(h.get("etag").is_none(), "it described the upstream's bytes");
        let body = body_of(resp).await;
        assert_eq!(body["error"]["message"], "upstream error (422): Unprocessable: bad field");
    }

    #[tokio::test]
    async fn an_openai_shaped_error_passes_with_its_own_content_type() {
        let raw = br#"{"error":{"message":"m","type":"invalid_request_error","code":"c"}}"#;
        let resp = upstream_error(UpstreamAnswer {
            status: StatusCode::BAD_REQUEST,
            headers: upstream_headers("application/json; charset=utf-8"),
            body: Bytes::from_static(raw),
        });
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json; charset=utf-8");
        assert_eq!(resp.headers()["x-request-id"], "upstream-req-1");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], raw);
    }
}
