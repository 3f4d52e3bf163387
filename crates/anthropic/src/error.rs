//! What can go wrong, and errors in Anthropic's shape.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sse::write_event;

/// Why a translation could not be done.
///
/// [`TranslateError::to_api_error`] turns any of them into the error a
/// Messages client should see.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TranslateError {
    /// The Messages request is not valid JSON, misses a required field or
    /// puts a block where it cannot be (a `tool_use` in a user message).
    #[error("invalid Messages request: {reason}")]
    InvalidRequest {
        /// What is wrong, with the field's path when known
        /// (`messages[2].content[0]: …`).
        reason: String,
    },
    /// A content block of a type chat completions cannot carry.
    #[error("{location}: content block type `{kind}` is not supported by this gateway")]
    UnsupportedBlock {
        /// Where it is (`messages[3].content[1]`, `system[0]`).
        location: String,
        /// Its `type`.
        kind: String,
    },
    /// The upstream's answer is not a chat completion this crate can read.
    #[error("upstream answer is not a chat completion: {reason}")]
    InvalidResponse {
        /// What is wrong with it.
        reason: String,
    },
    /// One streamed chunk (an SSE `data:` payload) cannot be read. The
    /// [`StreamTranslator`](crate::StreamTranslator) is unchanged: the caller
    /// may skip the chunk or end the stream with an
    /// [`error_event`](crate::error_event).
    #[error("upstream stream chunk cannot be read: {reason}")]
    InvalidChunk {
        /// What is wrong with it.
        reason: String,
    },
    /// The upstream sent an error object (`{"error": …}`) where an answer or
    /// a chunk was expected.
    #[error("upstream error ({}): {message}", kind.as_str())]
    Upstream {
        /// The Anthropic error type it maps to.
        kind: ErrorKind,
        /// The upstream's message.
        message: String,
    },
}

impl TranslateError {
    /// The error to send a Messages client: request problems are
    /// `invalid_request_error`, unreadable upstream answers `api_error`, an
    /// upstream error object keeps its kind.
    pub fn to_api_error(&self) -> ApiError {
        let kind = match self {
            TranslateError::InvalidRequest { .. } | TranslateError::UnsupportedBlock { .. } => {
                ErrorKind::InvalidRequest
            }
            TranslateError::InvalidResponse { .. } | TranslateError::InvalidChunk { .. } => ErrorKind::Api,
            TranslateError::Upstream { kind, message } => return ApiError::new(*kind, message.clone()),
        };
        ApiError::new(kind, self.to_string())
    }
}

/// Anthropic's error types (`error.type` in an error body or event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `invalid_request_error` (400, 413, 422).
    #[serde(rename = "invalid_request_error")]
    InvalidRequest,
    /// `authentication_error` (401).
    #[serde(rename = "authentication_error")]
    Authentication,
    /// `permission_error` (403).
    #[serde(rename = "permission_error")]
    Permission,
    /// `not_found_error` (404).
    #[serde(rename = "not_found_error")]
    NotFound,
    /// `rate_limit_error` (429).
    #[serde(rename = "rate_limit_error")]
    RateLimit,
    /// `api_error` (500 and anything else).
    #[serde(rename = "api_error")]
    Api,
    /// `overloaded_error` (503, 529).
    #[serde(rename = "overloaded_error")]
    Overloaded,
}

impl ErrorKind {
    /// The kind for an HTTP status: 429 `rate_limit_error`, 401
    /// `authentication_error`, 403 `permission_error`, 404
    /// `not_found_error`, 400/413/422 `invalid_request_error`, 503/529
    /// `overloaded_error`, anything else `api_error`.
    pub const fn from_status(status: u16) -> Self {
        match status {
            400 | 413 | 422 => ErrorKind::InvalidRequest,
            401 => ErrorKind::Authentication,
            403 => ErrorKind::Permission,
            404 => ErrorKind::NotFound,
            429 => ErrorKind::RateLimit,
            503 | 529 => ErrorKind::Overloaded,
            _ => ErrorKind::Api,
        }
    }

    /// The status Anthropic answers this kind with (`overloaded_error` is
    /// Anthropic's 529, which its SDKs retry like a 5xx).
    pub const fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::Permission => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::RateLimit => 429,
            ErrorKind::Api => 500,
            ErrorKind::Overloaded => 529,
        }
    }

    /// Its name on the wire (`rate_limit_error`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }

    /// The kind an error's own `type` or `code` string names, OpenAI's or
    /// Anthropic's (`rate_limit_exceeded`, `invalid_api_key`,
    /// `overloaded_error`, …), or `None` for one it does not know.
    pub fn from_name(name: &str) -> Option<Self> {
        let kind = match name {
            "invalid_request_error" | "invalid_request" | "context_length_exceeded" | "bad_request" => {
                ErrorKind::InvalidRequest
            }
            "authentication_error" | "invalid_api_key" | "unauthorized" => ErrorKind::Authentication,
            "permission_error" | "permission_denied" | "forbidden" => ErrorKind::Permission,
            "not_found_error" | "model_not_found" | "not_found" => ErrorKind::NotFound,
            "rate_limit_error" | "rate_limit_exceeded" | "insufficient_quota" | "tokens" | "requests" => {
                ErrorKind::RateLimit
            }
            "overloaded_error" | "overloaded" | "service_unavailable" => ErrorKind::Overloaded,
            "api_error" | "server_error" | "internal_error" => ErrorKind::Api,
            _ => return None,
        };
        Some(kind)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as Anthropic sends it:
/// `{"type":"error","error":{"type":"rate_limit_error","message":"…"}}`.
///
/// Serialize it (or call [`ApiError::to_json`]) for a response body with
/// [`ErrorKind::status`]; [`ApiError::to_event`] for a stream that has already
/// started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Its type.
    pub kind: ErrorKind,
    /// What a person reads.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// The error for an HTTP `status` (see [`ErrorKind::from_status`]).
    pub fn from_status(status: u16, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::from_status(status), message)
    }

    /// The error for an upstream's failed answer: `status` and its body.
    ///
    /// The message is read from OpenAI's `{"error":{"message","type","code"}}`,
    /// from Anthropic's own shape, from `{"error":"…"}`, `{"message":"…"}` or
    /// `{"detail":"…"}` (FastAPI, NVIDIA NIM); otherwise the body's text
    /// (up to 500 bytes), or the status when the body is empty. The kind comes
    /// from an error status (4xx/5xx); for any other status (an error object
    /// inside a 200 stream) from the body's `type` or `code`, else `api_error`.
    pub fn from_openai_body(status: u16, body: &[u8]) -> Self {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let (message, name) = match &parsed {
            Some(value) => error_fields(value),
            None => (None, None),
        };
        let kind = if status >= 400 {
            ErrorKind::from_status(status)
        } else {
            name.as_deref().and_then(ErrorKind::from_name).unwrap_or(ErrorKind::Api)
        };
        let message = message.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("upstream answered {status}")
            } else {
                truncate(text, 500).to_owned()
            }
        });
        Self::new(kind, message)
    }

    /// The body: `{"type":"error","error":{"type":…,"message":…}}`.
    pub fn to_json(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.message.len() + 64);
        if serde_json::to_writer(&mut out, self).is_err() {
            // Unreachable: a struct of strings always serializes into a Vec.
            out.clear();
        }
        Bytes::from(out)
    }

    /// The SSE event: `event: error\ndata: {…}\n\n`.
    pub fn to_event(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.message.len() + 80);
        write_event(&mut out, "error", self);
        Bytes::from(out)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

impl Serialize for ApiError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Inner<'a> {
            #[serde(rename = "type")]
            kind: ErrorKind,
            message: &'a str,
        }
        #[derive(Serialize)]
        #[serde(tag = "type", rename = "error")]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        Outer { error: Inner { kind: self.kind, message: &self.message } }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ApiError {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Inner {
            #[serde(rename = "type")]
            kind: ErrorKind,
            message: String,
        }
        #[derive(Deserialize)]
        struct Outer {
            error: Inner,
        }
        let outer = Outer::deserialize(deserializer)?;
        Ok(Self::new(outer.error.kind, outer.error.message))
    }
}

/// An Anthropic `error` event for a failure after the stream has started:
/// `event: error\ndata: {"type":"error","error":{"type":…,"message":…}}\n\n`.
/// Send it, then end the stream.
pub fn error_event(kind: ErrorKind, message: &str) -> Bytes {
    ApiError::new(kind, message).to_event()
}

/// The message and the type (or code) name of an error body, whichever shape.
pub(crate) fn error_fields(value: &Value) -> (Option<String>, Option<String>) {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    match value.get("error") {
        Some(Value::Object(error)) => {
            let name = text(error.get("type")).or_else(|| text(error.get("code")));
            // A type that says nothing (`"error"`) gives way to the code.
            let name = match name.as_deref() {
                Some("error") | Some("") => text(error.get("code")),
                _ => name,
            };
            (text(error.get("message")), name)
        }
        Some(Value::String(message)) => (Some(message.clone()), None),
        _ => {
            let message = text(value.get("message")).or_else(|| text(value.get("detail")));
            (message, text(value.get("type")).or_else(|| text(value.get("code"))))
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let table = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "invalid_request_error"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "api_error"),
            (529, "overloaded_error"),
            (418, "api_error"),
        ];
        for (status, kind) in table {
            assert_eq!(ErrorKind::from_status(status).as_str(), kind, "status {status}");
        }
    }

    #[test]
    fn body_and_event_shapes() {
        let error = ApiError::from_status(429, "slow down");
        assert_eq!(
            &error.to_json()[..],
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#
        );
        assert_eq!(
            &error_event(ErrorKind::Overloaded, "busy")[..],
            &b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n"[..]
        );
        let back: ApiError = serde_json::from_slice(&error.to_json()).unwrap();
        assert_eq!(back, error);
    }

    #[test]
    fn openai_bodies_translate() {
        let table: [(u16, &[u8], ErrorKind, &str); 9] = [
            (
                429,
                br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
                ErrorKind::RateLimit,
                "Rate limit reached",
            ),
            (
                400,
                br#"{"error":{"message":"context too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
                ErrorKind::InvalidRequest,
                "context too long",
            ),
            (401, br#"{"error":"bad key"}"#, ErrorKind::Authentication, "bad key"),
            (404, br#"{"detail":"Function not found"}"#, ErrorKind::NotFound, "Function not found"),
            (503, br#"{"message":"try later"}"#, ErrorKind::Overloaded, "try later"),
            (
                500,
                br#"{"type":"error","error":{"type":"overloaded_error","message":"anthropic-shaped"}}"#,
                ErrorKind::Api,
                "anthropic-shaped",
            ),
            (502, b"<html>Bad Gateway</html>", ErrorKind::Api, "<html>Bad Gateway</html>"),
            (500, b"", ErrorKind::Api, "upstream answered 500"),
            // An error object inside a 200 stream: the body's type decides.
            (
                200,
                br#"{"error":{"message":"quota","type":"error","code":"rate_limit_exceeded"}}"#,
                ErrorKind::RateLimit,
                "quota",
            ),
        ];
        for (status, body, kind, message) in table {
            let error = ApiError::from_openai_body(status, body);
            assert_eq!((error.kind, error.message.as_str()), (kind, message), "{status} {body:?}");
        }
    }

    #[test]
    fn long_text_bodies_are_cut_at_a_char_boundary() {
        let body = "é".repeat(400);
        let error = ApiError::from_openai_body(500, body.as_bytes());
        assert_eq!(error.message.len(), 500);
    }

    #[test]
    fn translate_errors_become_api_errors() {
        let e = TranslateError::UnsupportedBlock {
            location: "messages[0].content[0]".into(),
            kind: "document".into(),
        };
        let api = e.to_api_error();
        assert_eq!(api.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            api.message,
            "messages[0].content[0]: content block type `document` is not supported by this gateway"
        );
        let e = TranslateError::Upstream { kind: ErrorKind::RateLimit, message: "later".into() };
        assert_eq!(e.to_api_error(), ApiError::new(ErrorKind::RateLimit, "later"));
    }
}
