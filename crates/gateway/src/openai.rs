//! OpenAI-shaped errors: the gateway's own, and upstream errors rewritten into
//! `{"error":{"message","type","code"}}` so the OpenAI SDKs show the real cause.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::body::{ProxyBody, full};

/// The OpenAI error `type` that fits a status.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 413 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 | 410 => "not_found_error",
        408 | 504 => "timeout_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        _ => "api_error",
    }
}

/// An OpenAI-shaped JSON error response.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response<ProxyBody> {
    let body = json!({"error": {"message": message.into(), "type": error_type(status), "param": null, "code": code}});
    json_response(status, &body)
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The longest upstream error text quoted in a rewritten message.
const MAX_QUOTED: usize = 1_000;

/// Turns an upstream error body into an OpenAI-shaped one, keeping the
/// message. Bodies that already are OpenAI-shaped come back as they are
/// (`None`); NVIDIA's problem JSON (`{status,title,detail}`), vLLM-style
/// `{"message":…}`, plain text and empty bodies are rewritten.
pub fn rewrite_upstream_error(status: StatusCode, body: &Bytes) -> Option<Value> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) {
        if err.is_object() && err.get("message").is_some() {
            return None;
        }
    }
    let message = parsed
        .as_ref()
        .and_then(|v| {
            let pick = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
            match (pick("title"), pick("detail")) {
                (Some(t), Some(d)) => Some(format!("{t}: {d}")),
                (t, d) => d
                    .or(t)
                    .or_else(|| pick("message"))
                    .or_else(|| v.get("error").and_then(Value::as_str))
                    .map(str::to_owned),
            }
        })
        .or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            (!text.is_empty()).then(|| text.chars().take(MAX_QUOTED).collect())
        })
        .unwrap_or_else(|| {
            format!(
                "upstream answered {} {} with no body",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )
            .trim_end()
            .to_owned()
        });
    let code = match status.as_u16() {
        429 => "rate_limit_exceeded".to_owned(),
        s => format!("upstream_{s}"),
    };
    Some(json!({"error": {
        "message": format!("upstream error ({}): {message}", status.as_u16()),
        "type": error_type(status),
        "param": null,
        "code": code,
    }}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(status: u16, body: &str) -> String {
        let v = rewrite_upstream_error(StatusCode::from_u16(status).unwrap(), &Bytes::from(body.to_owned()))
            .unwrap();
        v["error"]["message"].as_str().unwrap().to_owned()
    }

    #[test]
    fn nvidia_shapes_become_openai_shapes() {
        assert_eq!(
            message(429, r#"{"status":429,"title":"Too Many Requests"}"#),
            "upstream error (429): Too Many Requests"
        );
        assert_eq!(
            message(401, r#"{"status":401,"title":"Unauthorized","detail":"Authentication failed"}"#),
            "upstream error (401): Unauthorized: Authentication failed"
        );
        assert_eq!(
            message(410, "The model 'x' has reached its end of life"),
            "upstream error (410): The model 'x' has reached its end of life"
        );
        assert_eq!(message(404, ""), "upstream error (404): upstream answered 404 Not Found with no body");
        assert_eq!(
            message(400, r#"{"object":"error","message":"bad param","type":"BadRequestError"}"#),
            "upstream error (400): bad param"
        );
        let v = rewrite_upstream_error(StatusCode::TOO_MANY_REQUESTS, &Bytes::from_static(b"{}")).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }

    #[test]
    fn openai_shaped_errors_pass_untouched() {
        let body = Bytes::from_static(br#"{"error":{"message":"m","type":"t","code":"c"}}"#);
        assert!(rewrite_upstream_error(StatusCode::BAD_REQUEST, &body).is_none());
    }
}
