//! One message to one endpoint: the signed POST, and the retries with backoff until it is
//! delivered or given up.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::config::MAX_BACKOFF;
use crate::event::{Event, EventKind, now_ms};
use crate::metrics::Metrics;
use crate::signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign};
use crate::time::format_rfc3339_ms;

/// The HTTP client shared by every delivery: http and https (Mozilla roots), HTTP/1.1.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How much of an answer's body is read (and thrown away) so the connection can be reused.
const MAX_ANSWER_BODY: usize = 64 * 1024;

const UA: &str = concat!("proxypal-webhooks/", env!("CARGO_PKG_VERSION"));

/// Builds the client. The crypto provider is passed explicitly: the workspace links rustls
/// with both ring and aws-lc-rs, and asking rustls for "the" default would panic unless the
/// embedder installed one.
pub(crate) fn build_client(timeout: Duration) -> Result<HttpClient, rustls::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false); // the HTTPS connector checks the scheme instead
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let https = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        // Without a pool timer the idle timeout is never applied.
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4)
        .build(https))
}

/// One event, serialized once for every endpoint and retry.
#[derive(Debug)]
pub(crate) struct Message {
    /// `webhook-id`: the same on every endpoint and every retry.
    pub(crate) id: String,
    pub(crate) kind: EventKind,
    pub(crate) body: Bytes,
}

/// The Standard Webhooks payload: `type`, `timestamp`, `data`.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: &'a Map<String, Value>,
}

impl Message {
    pub(crate) fn from_event(event: Event) -> Result<Self, serde_json::Error> {
        let Event { kind, at_ms, provider, key, client, mut data } = event;
        // The subject's identity wins over a figure of the same name.
        for (name, value) in [("provider", provider), ("key", key), ("client", client)] {
            if let Some(value) = value {
                data.insert(name.to_owned(), Value::String(value));
            }
        }
        let payload = Payload { kind: kind.as_str(), timestamp: format_rfc3339_ms(at_ms), data: &data };
        let body = serde_json::to_vec(&payload)?;
        Ok(Message { id: new_message_id(), kind, body: Bytes::from(body) })
    }
}

/// `msg_` and 128 random bits in hex (or, should the system RNG fail, the clock and a
/// process-wide counter: unique still, just guessable, which an id may be).
fn new_message_id() -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    let mut bytes = [0u8; 16];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&now_ms().to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
    }
    let mut id = String::with_capacity(4 + 32);
    id.push_str("msg_");
    for b in bytes {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// An endpoint as the delivery tasks see it.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) url: Uri,
    pub(crate) secret: Option<Secret>,
    /// `host[:port]`, for logs.
    pub(crate) label: String,
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) max_attempts: u32,
    pub(crate) first_backoff: Duration,
    pub(crate) timeout: Duration,
}

/// The wait after failed attempt `n` (1-based): `first`, doubling, capped at [`MAX_BACKOFF`].
pub(crate) fn backoff(first: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Why an attempt did not count as delivered.
#[derive(Debug)]
enum AttemptError {
    Status(StatusCode),
    Transport(hyper_util::client::legacy::Error),
    Timeout(Duration),
    Request(http::Error),
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Status(s) => write!(f, "answered {s}"),
            AttemptError::Transport(e) => {
                // The chain carries the useful part ("tcp connect error: Connection refused");
                // none of hyper's messages repeat the URL.
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
            AttemptError::Timeout(t) => write!(f, "no answer within {t:?}"),
            AttemptError::Request(e) => write!(f, "could not build the request: {e}"),
        }
    }
}

/// One signed POST, bounded by `timeout` up to the answer's status line; a 2xx is delivered.
async fn attempt(
    client: &HttpClient,
    target: &Target,
    msg: &Message,
    timeout: Duration,
) -> Result<(), AttemptError> {
    let deadline = Instant::now() + timeout;
    // The timestamp is the attempt's: receivers refuse stale ones, and a retry may come
    // minutes after the first attempt.
    let ts = now_ms().div_euclid(1000);
    let mut req = Request::post(target.url.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, UA)
        .header(HEADER_ID, msg.id.as_str())
        .header(HEADER_TIMESTAMP, ts)
        .body(Full::new(msg.body.clone()))
        .map_err(AttemptError::Request)?;
    if let Some(secret) = &target.secret {
        let signature = sign(secret, &msg.id, ts, &msg.body);
        // Base64 and "v1," only: always a valid header value.
        if let Ok(mut value) = HeaderValue::from_str(&signature) {
            value.set_sensitive(true);
            req.headers_mut().insert(HEADER_SIGNATURE, value);
        }
    }
    let answer = tokio::time::timeout_at(deadline, client.request(req))
        .await
        .map_err(|_| AttemptError::Timeout(timeout))?
        .map_err(AttemptError::Transport)?;
    let status = answer.status();
    // Read the (small) body so the connection goes back to the pool; its fate does not
    // change the verdict.
    let _ =
        tokio::time::timeout_at(deadline, Limited::new(answer.into_body(), MAX_ANSWER_BODY).collect()).await;
    if status.is_success() { Ok(()) } else { Err(AttemptError::Status(status)) }
}

/// Delivers `msg` to `target`, retrying failed attempts with backoff, and counts the outcome.
pub(crate) async fn deliver(
    client: &HttpClient,
    target: &Target,
    msg: &Message,
    policy: Policy,
    metrics: &Metrics,
) {
    let attempts = policy.max_attempts.max(1);
    for n in 1..=attempts {
        match attempt(client, target, msg, policy.timeout).await {
            Ok(()) => {
                metrics.delivered(msg.kind).inc();
                tracing::debug!(endpoint = %target.label, event = msg.kind.as_str(), id = %msg.id, attempt = n, "webhook delivered");
                return;
            }
            Err(error) if n < attempts => {
                metrics.retried(msg.kind).inc();
                let wait = backoff(policy.first_backoff, n);
                tracing::debug!(
                    endpoint = %target.label, event = msg.kind.as_str(), id = %msg.id, attempt = n,
                    %error, ?wait, "webhook attempt failed; will retry"
                );
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                metrics.failed(msg.kind).inc();
                tracing::warn!(
                    endpoint = %target.label, event = msg.kind.as_str(), id = %msg.id, attempts,
                    %error, "webhook delivery failed; giving up"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_and_caps_at_a_minute() {
        let s = Duration::from_secs;
        let waits: Vec<Duration> = (1..=9).map(|n| backoff(s(1), n)).collect();
        assert_eq!(waits, [s(1), s(2), s(4), s(8), s(16), s(32), s(60), s(60), s(60)]);
        assert_eq!(backoff(Duration::from_millis(10), 3), Duration::from_millis(40));
        assert_eq!(backoff(s(1), 200), s(60), "no overflow on absurd attempt counts");
    }

    #[test]
    fn payload_follows_the_standard_webhooks_shape() {
        let event = Event::new(EventKind::KeyDisabled)
            .at_ms(1_614_265_330_250)
            .provider("nvidia")
            .key("nvidia-3")
            .figure("key", "a figure may not override the subject")
            .figure("remaining", 0);
        let msg = Message::from_event(event).unwrap();
        let body: Value = serde_json::from_slice(&msg.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "key.disabled",
                "timestamp": "2021-02-25T15:02:10.250Z",
                "data": {"provider": "nvidia", "key": "nvidia-3", "remaining": 0}
            })
        );
    }

    #[test]
    fn message_ids_are_prefixed_hex_and_distinct() {
        let a = new_message_id();
        let b = new_message_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("msg_") && a[4..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
