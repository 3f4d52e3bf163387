//! Fault injection: misbehaviours a test can make the simulator show.

use std::time::Duration;

/// The function id used in NVIDIA-style "function" error messages.
pub const SIM_FUNCTION_ID: &str = "3e5c6a7b-8d9e-4f01-9a2b-3c4d5e6f7a8b";

/// A misbehaviour injected into the next matching request (see
/// [`SimHandle::push_fault`](crate::SimHandle::push_fault)) or into every
/// request (see [`SimHandle::set_fault_always`](crate::SimHandle::set_fault_always)).
///
/// Faults are applied before authentication and rate limiting: a faulted
/// request does not consume the key's rate budget, and is counted in
/// [`KeyCounters::faults`](crate::KeyCounters::faults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status, content type, extra headers and body.
    Status {
        /// HTTP status code (an invalid code becomes 500).
        status: u16,
        /// `Content-Type` header, if any.
        content_type: Option<String>,
        /// Extra response headers (name, value); invalid ones are skipped.
        headers: Vec<(String, String)>,
        /// Response body (may be empty).
        body: String,
    },
    /// Wait this long, then handle the request normally.
    Delay(Duration),
    /// Close the TCP connection without sending any response.
    DropConnection,
    /// Write bytes that are not HTTP on the raw socket, then close it.
    Garbage,
    /// Answer with a `200 text/event-stream` chat stream that sends
    /// `after_chunks` content chunks and then goes silent until the client
    /// goes away.
    StallMidStream {
        /// Number of content chunks sent before stalling.
        after_chunks: usize,
    },
    /// Answer with a `200 text/event-stream` chat stream that sends
    /// `after_chunks` content chunks and then aborts the connection (no
    /// `[DONE]`, no clean end of body).
    BreakMidStream {
        /// Number of content chunks sent before breaking.
        after_chunks: usize,
    },
}

impl Fault {
    /// A response with `application/json` content type.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Self::Status {
            status,
            content_type: Some("application/json".to_owned()),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A problem-details JSON response `{"status","title","detail"}`.
    pub fn problem(status: u16, title: &str, detail: &str) -> Self {
        Self::status(status, problem_json(status, title, detail))
    }

    /// A `text/plain` response.
    pub fn plain_text(status: u16, text: impl Into<String>) -> Self {
        Self::Status {
            status,
            content_type: Some("text/plain; charset=utf-8".to_owned()),
            headers: Vec::new(),
            body: text.into(),
        }
    }

    /// A response with no body and no content type.
    pub fn empty(status: u16) -> Self {
        Self::Status { status, content_type: None, headers: Vec::new(), body: String::new() }
    }

    /// Adds a response header to a [`Fault::Status`] (no effect on other
    /// variants).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let Self::Status { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    /// NVIDIA's model-level concurrency cap: 503
    /// `Worker local total request limit reached (64/64)`.
    pub fn worker_limit() -> Self {
        Self::problem(503, "Service Unavailable", "Worker local total request limit reached (64/64)")
    }

    /// NVIDIA's degraded-model error: 400
    /// `Function id '<uuid>': DEGRADED function cannot be invoked`.
    pub fn degraded() -> Self {
        Self::problem(
            400,
            "Bad Request",
            &format!("Function id '{SIM_FUNCTION_ID}': DEGRADED function cannot be invoked"),
        )
    }

    /// NVIDIA's retired-model error: 410 `text/plain`
    /// `The model '<model>' has reached its end of life on 2026-09-03T08:00:00Z`.
    pub fn end_of_life(model: &str) -> Self {
        Self::plain_text(
            410,
            format!("The model '{model}' has reached its end of life on 2026-09-03T08:00:00Z"),
        )
    }

    /// NVIDIA's per-account model 404:
    /// `Function '<uuid>': Not found for account '<account>'`.
    pub fn function_not_found() -> Self {
        Self::problem(404, "Not Found", &not_found_detail())
    }

    /// NVIDIA's bare 429 `{"status":429,"title":"Too Many Requests"}`.
    pub fn rate_limited() -> Self {
        Self::status(429, RATE_LIMITED_BODY)
    }

    /// NVIDIA's 401 `Authentication failed`.
    pub fn unauthorized() -> Self {
        Self::status(401, UNAUTHORIZED_BODY)
    }

    /// NVIDIA's 403 `Authorization failed`.
    pub fn forbidden() -> Self {
        Self::status(403, FORBIDDEN_BODY)
    }
}

/// Which requests a queued [`Fault`] applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    /// The next request, whatever its key.
    Any,
    /// The next request whose `Authorization: Bearer` token is this key.
    Key(String),
}

impl FaultTarget {
    /// Whether a request bearing `key` matches.
    pub(crate) fn matches(&self, key: Option<&str>) -> bool {
        match self {
            Self::Any => true,
            Self::Key(k) => key == Some(k.as_str()),
        }
    }
}

/// NVIDIA's exact 429 body.
pub const RATE_LIMITED_BODY: &str = r#"{"status":429,"title":"Too Many Requests"}"#;
/// NVIDIA's exact 401 body.
pub const UNAUTHORIZED_BODY: &str =
    r#"{"status":401,"title":"Unauthorized","detail":"Authentication failed"}"#;
/// NVIDIA's exact 403 body.
pub const FORBIDDEN_BODY: &str = r#"{"status":403,"title":"Forbidden","detail":"Authorization failed"}"#;

/// The `detail` of NVIDIA's per-account "function not found" 404.
pub(crate) fn not_found_detail() -> String {
    format!("Function '{SIM_FUNCTION_ID}': Not found for account 'sim-account'")
}

/// A problem-details body in NVIDIA's field order: `status`, `title`,
/// `detail`.
pub(crate) fn problem_json(status: u16, title: &str, detail: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    format!(r#"{{"status":{status},"title":{},"detail":{}}}"#, s(title), s(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_keeps_nvidia_order_and_escapes() {
        assert_eq!(
            problem_json(400, "Bad Request", "a \"q\""),
            r#"{"status":400,"title":"Bad Request","detail":"a \"q\""}"#
        );
        assert_eq!(
            Fault::worker_limit(),
            Fault::status(
                503,
                r#"{"status":503,"title":"Service Unavailable","detail":"Worker local total request limit reached (64/64)"}"#
            )
        );
    }
}
