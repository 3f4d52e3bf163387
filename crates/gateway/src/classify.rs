//! What an upstream answer means, decided in one place: status, headers and
//! (for errors) body in, one [`Verdict`] out — the key's [`Outcome`] for the
//! pool, the [`AttemptResult`] for the metrics, and whether to fail over.
//!
//! Pure functions, tested as a table without sockets (linkerd2-proxy's
//! classifiers are the model).

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderMap, StatusCode};
use proxypal_keypool::Outcome;
use proxypal_upstream::UpstreamError;

use crate::metrics::AttemptResult;

/// What to do with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Send it to the client: a success, or an error another key would not fix.
    Deliver,
    /// Try another key (if the request has attempts left).
    FailOver,
}

/// The one judgement of an upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verdict {
    /// What to report to the key pool about the key.
    pub outcome: Outcome,
    /// The metrics label of the attempt.
    pub result: AttemptResult,
    /// Deliver or fail over.
    pub action: Action,
}

impl Verdict {
    const fn new(outcome: Outcome, result: AttemptResult, action: Action) -> Self {
        Self { outcome, result, action }
    }

    /// Whether the upstream rejected the key itself (401/403).
    pub fn key_rejected(&self) -> bool {
        self.result == AttemptResult::KeyRejected
    }
}

/// Whether an answer with `status` is an error whose body is read (bounded):
/// to pass it back rewritten into the OpenAI shape, or to keep it as the
/// answer if every attempt fails. Successes stream untouched.
pub fn needs_body(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// Whether [`classify`]'s verdict on `status` depends on the body: only a
/// 5xx's does (a model's failure or the key's). Every other verdict is
/// reported before the body is read, so a rate-limited or rejected key rests
/// at once, even if reading the body is slow or the client goes away.
pub fn judged_by_body(status: StatusCode) -> bool {
    status.is_server_error()
}

/// Judges an upstream answer. `body` is the (bounded) error body, or empty
/// when [`needs_body`] is `false`.
///
/// | answer | key | attempt | action |
/// |---|---|---|---|
/// | 1xx–3xx | success | `ok` | deliver |
/// | 429 | rests (`Retry-After`/`retry-after-ms`, else the policy's default) | `rate_limited` | fail over |
/// | 401, 403 | disabled | `key_rejected` | fail over |
/// | other 4xx | success (the client's error) | `client_error` | deliver |
/// | 5xx naming a model-level failure | success (not the key's) | `model_error` | deliver |
/// | other 5xx | short growing cooldown | `server_error` | fail over |
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
    use Action::{Deliver, FailOver};
    match status.as_u16() {
        429 => Verdict::new(
            Outcome::RateLimited { retry_after: retry_after(headers) },
            AttemptResult::RateLimited,
            FailOver,
        ),
        401 | 403 => Verdict::new(Outcome::AuthFailed, AttemptResult::KeyRejected, FailOver),
        400..=499 => Verdict::new(Outcome::Success, AttemptResult::ClientError, Deliver),
        500..=599 if is_model_failure(body) => {
            Verdict::new(Outcome::Success, AttemptResult::ModelError, Deliver)
        }
        500..=599 => Verdict::new(Outcome::Transient, AttemptResult::ServerError, FailOver),
        _ => Verdict::new(Outcome::Success, AttemptResult::Ok, Deliver),
    }
}

/// Judges an attempt that got no answer: refused, reset, timed out. The key
/// (or its route) gets a short cooldown and the request fails over.
pub fn classify_transport(_error: &UpstreamError) -> Verdict {
    Verdict::new(Outcome::Transient, AttemptResult::TransportError, Action::FailOver)
}

/// NVIDIA failures that are the model's (shared by every key), not the key's:
/// switching keys would not help and the key must not be punished.
fn is_model_failure(body: &[u8]) -> bool {
    const MARKERS: [&[u8]; 2] = [b"Worker local total request limit", b"DEGRADED function"];
    MARKERS.iter().any(|m| body.windows(m.len()).any(|w| w == *m))
}

/// Parses `retry-after-ms` (OpenAI's, fractional milliseconds) or
/// `Retry-After` (whole seconds).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let ms = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        // `try_`: a value too large for a Duration (`1e30`) is ignored, not a panic.
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok());
    ms.or_else(|| {
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::{Deliver, FailOver};
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn verdicts_by_status_headers_and_body() {
        let nvidia_429 = br#"{"status":429,"title":"Too Many Requests"}"#.as_slice();
        let worker_limit = br#"{"detail":"Worker local total request limit reached (8/8)"}"#.as_slice();
        let degraded = b"Function id 'x': DEGRADED function cannot be invoked".as_slice();
        type Row<'a> = (u16, &'a [(&'static str, &'static str)], &'a [u8], Outcome, AttemptResult, Action);
        #[rustfmt::skip]
        let table: &[Row<'_>] = &[
            (200, &[], b"", Outcome::Success, AttemptResult::Ok, Deliver),
            (204, &[], b"", Outcome::Success, AttemptResult::Ok, Deliver),
            (302, &[], b"", Outcome::Success, AttemptResult::Ok, Deliver),
            (429, &[], nvidia_429, Outcome::RateLimited { retry_after: None }, AttemptResult::RateLimited, FailOver),
            (429, &[("retry-after", "7")], b"", Outcome::RateLimited { retry_after: Some(Duration::from_secs(7)) }, AttemptResult::RateLimited, FailOver),
            (429, &[("retry-after", "7"), ("retry-after-ms", "1500")], b"", Outcome::RateLimited { retry_after: Some(Duration::from_millis(1500)) }, AttemptResult::RateLimited, FailOver),
            (429, &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], b"", Outcome::RateLimited { retry_after: None }, AttemptResult::RateLimited, FailOver),
            (401, &[], b"", Outcome::AuthFailed, AttemptResult::KeyRejected, FailOver),
            (403, &[], b"{}", Outcome::AuthFailed, AttemptResult::KeyRejected, FailOver),
            (400, &[], b"bad", Outcome::Success, AttemptResult::ClientError, Deliver),
            (404, &[], b"", Outcome::Success, AttemptResult::ClientError, Deliver),
            (410, &[], b"end of life", Outcome::Success, AttemptResult::ClientError, Deliver),
            (422, &[("retry-after", "3")], b"", Outcome::Success, AttemptResult::ClientError, Deliver),
            (500, &[], b"internal error", Outcome::Transient, AttemptResult::ServerError, FailOver),
            (502, &[], b"", Outcome::Transient, AttemptResult::ServerError, FailOver),
            (503, &[], worker_limit, Outcome::Success, AttemptResult::ModelError, Deliver),
            (500, &[], degraded, Outcome::Success, AttemptResult::ModelError, Deliver),
            (504, &[], b"", Outcome::Transient, AttemptResult::ServerError, FailOver),
        ];
        for (status, hs, body, outcome, result, action) in table {
            let status = StatusCode::from_u16(*status).unwrap();
            let got = classify(status, &headers(hs), body);
            assert_eq!(
                got,
                Verdict { outcome: *outcome, result: *result, action: *action },
                "status {status}, headers {hs:?}, body {:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(got.key_rejected(), matches!(status.as_u16(), 401 | 403), "{status}");
        }
    }

    #[test]
    fn only_a_5xx_verdict_waits_for_the_body() {
        for status in [200, 400, 401, 403, 404, 422, 429] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(!judged_by_body(status), "{status}");
            // The verdict without the body is the verdict with any body.
            assert_eq!(
                classify(status, &HeaderMap::new(), b""),
                classify(status, &HeaderMap::new(), b"DEGRADED function")
            );
        }
        assert!(judged_by_body(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn only_errors_need_their_body() {
        for (status, needs) in
            [(200, false), (101, false), (304, false), (400, true), (429, true), (503, true)]
        {
            assert_eq!(needs_body(StatusCode::from_u16(status).unwrap()), needs, "{status}");
        }
    }

    #[test]
    fn retry_after_headers_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        for ignored in ["-3", "NaN", "inf", "1e30", "soon"] {
            h.insert("retry-after-ms", HeaderValue::from_static(ignored));
            assert_eq!(retry_after(&h), Some(Duration::from_secs(7)), "retry-after-ms: {ignored} is ignored");
        }
    }
}
