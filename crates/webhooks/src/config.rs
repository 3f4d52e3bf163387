//! Where to deliver ([`Endpoint`]) and how hard to try ([`WebhookConfig`]).

use std::fmt;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::event::EventKind;
use crate::signing::Secret;

/// One receiver: its URL, the events it wants and the secret that signs its deliveries.
///
/// Deserializes from the configuration's shape:
///
/// ```
/// use proxypal_webhooks::{Endpoint, EventKind};
///
/// let ep: Endpoint = serde_json::from_str(r#"{
///     "url": "https://hooks.example.com/proxypal",
///     "events": ["key.disabled", "pool.exhausted"],
///     "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
/// }"#)?;
/// assert!(ep.subscribes(EventKind::PoolExhausted));
/// assert!(!ep.subscribes(EventKind::QuotaWarning));
/// # Ok::<(), serde_json::Error>(())
/// ```
///
/// `Debug` shows only the scheme, host and port: webhook URLs often carry a token in their
/// path (Slack, Discord), and the secret is masked.
#[derive(Clone, Deserialize)]
#[serde(try_from = "RawEndpoint")]
pub struct Endpoint {
    /// Where deliveries are POSTed: an absolute `http` or `https` URL.
    pub url: Uri,
    /// The events this endpoint receives; empty means all of them.
    pub events: Vec<EventKind>,
    /// Signs deliveries (`webhook-signature`); without it, none is sent.
    pub secret: Option<Secret>,
}

/// An endpoint URL that cannot be delivered to. The message names the problem, not the URL
/// (whose path may be a credential).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEndpoint {
    /// Not a URI at all.
    #[error("webhook url is not a valid URL: {0}")]
    Uri(String),
    /// A scheme other than `http` or `https` (or none).
    #[error("webhook url must start with http:// or https://")]
    Scheme,
    /// No host to connect to.
    #[error("webhook url has no host")]
    NoHost,
    /// The `secret` field could not be used.
    #[error(transparent)]
    Secret(#[from] crate::signing::InvalidSecret),
}

impl Endpoint {
    /// An endpoint for `url` receiving every event, unsigned.
    ///
    /// # Errors
    /// A URL that does not parse, is not `http`/`https`, or has no host.
    pub fn new(url: &str) -> Result<Self, InvalidEndpoint> {
        let url: Uri = url.parse().map_err(|e: http::uri::InvalidUri| InvalidEndpoint::Uri(e.to_string()))?;
        Self::check_url(&url)?;
        Ok(Endpoint { url, events: Vec::new(), secret: None })
    }

    /// Restricts the endpoint to `events` (empty: all).
    #[must_use]
    pub fn events(mut self, events: impl IntoIterator<Item = EventKind>) -> Self {
        self.events = events.into_iter().collect();
        self
    }

    /// Signs deliveries with `secret`.
    #[must_use]
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Whether this endpoint receives events of `kind`.
    pub fn subscribes(&self, kind: EventKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }

    /// The kinds received, as a bit set over [`EventKind::index`].
    pub(crate) fn mask(&self) -> u8 {
        EventKind::ALL.into_iter().filter(|k| self.subscribes(*k)).fold(0, |m, k| m | k.bit())
    }

    /// `host` or `host:port`: how logs name the endpoint (never its path or query).
    pub fn host_label(&self) -> String {
        match (self.url.host(), self.url.port_u16()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => String::from("?"),
        }
    }

    pub(crate) fn check_url(url: &Uri) -> Result<(), InvalidEndpoint> {
        match url.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(InvalidEndpoint::Scheme),
        }
        match url.host() {
            Some(h) if !h.is_empty() => Ok(()),
            _ => Err(InvalidEndpoint::NoHost),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &format_args!("{}://{}/…", self.url.scheme_str().unwrap_or("?"), self.host_label()))
            .field("events", &self.events)
            .field("secret", &self.secret)
            .finish()
    }
}

/// The configuration's shape, checked into an [`Endpoint`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: String,
    #[serde(default)]
    events: Vec<EventKind>,
    #[serde(default)]
    secret: Option<String>,
}

impl TryFrom<RawEndpoint> for Endpoint {
    type Error = InvalidEndpoint;

    fn try_from(raw: RawEndpoint) -> Result<Self, Self::Error> {
        let mut ep = Endpoint::new(&raw.url)?.events(raw.events);
        if let Some(secret) = raw.secret {
            ep.secret = Some(Secret::parse(&secret)?);
        }
        Ok(ep)
    }
}

/// Everything [`Webhooks::start`](crate::Webhooks::start) needs. Build it with
/// `WebhookConfig { endpoints, ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The receivers; with none, [`Webhooks::start`](crate::Webhooks::start) returns a
    /// disabled handle.
    pub endpoints: Vec<Endpoint>,
    /// Attempts per delivery, the first included (default 6; 0 counts as 1).
    pub max_attempts: u32,
    /// Wait before the first retry; it doubles per retry up to [`MAX_BACKOFF`] (default 1 s).
    pub first_backoff: Duration,
    /// Bound on one attempt: connecting, sending and reading the answer (default 10 s).
    pub timeout: Duration,
    /// Events waiting for the background task, and messages waiting per endpoint, before
    /// new ones are dropped and counted (default 1024).
    pub queue: usize,
    /// Deliveries in progress at once per endpoint, retries and their waits included
    /// (default 16). This is what keeps a dead endpoint from holding unbounded work, and
    /// why it cannot delay the others: each endpoint has its own queue and tasks.
    pub max_in_flight_per_endpoint: usize,
    /// Deduplication entries kept, for states and for quota windows each (default 4096);
    /// see [`Webhooks::emit`](crate::Webhooks::emit).
    pub dedup_capacity: usize,
}

/// The cap on the wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            endpoints: Vec::new(),
            max_attempts: 6,
            first_backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            queue: 1024,
            max_in_flight_per_endpoint: 16,
            dedup_capacity: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_being_echoed() {
        assert!(Endpoint::new("https://hooks.example.com/x").is_ok());
        assert!(Endpoint::new("http://127.0.0.1:9000/").is_ok());
        assert_eq!(Endpoint::new("ftp://h/x").unwrap_err(), InvalidEndpoint::Scheme);
        assert_eq!(Endpoint::new("/relative/only").unwrap_err(), InvalidEndpoint::Scheme);
        let err = Endpoint::new("https://hooks.example.com/T0KEN with space").unwrap_err();
        assert!(!err.to_string().contains("T0KEN"), "{err}");
    }

    #[test]
    fn debug_hides_the_path_and_the_secret() {
        let ep = Endpoint::new("https://hooks.slack.com:8443/services/T0KEN")
            .unwrap()
            .secret(Secret::parse("whsec_c2VjcmV0").unwrap());
        let shown = format!("{ep:?}");
        assert!(shown.contains("https://hooks.slack.com:8443/…"), "{shown}");
        assert!(!shown.contains("T0KEN") && !shown.contains("c2VjcmV0"), "{shown}");
    }

    #[test]
    fn deserializes_the_configuration_shape() {
        let ep: Endpoint = serde_json::from_str(
            r#"{"url":"https://h.example/p","events":["pool.exhausted","pool.recovered"]}"#,
        )
        .unwrap();
        assert_eq!(ep.events, [EventKind::PoolExhausted, EventKind::PoolRecovered]);
        assert!(ep.secret.is_none());
        assert_eq!(ep.mask(), EventKind::PoolExhausted.bit() | EventKind::PoolRecovered.bit());
        let all: Endpoint = serde_json::from_str(r#"{"url":"https://h.example/p"}"#).unwrap();
        assert_eq!(all.mask(), 0b11_1111);
        let err = serde_json::from_str::<Endpoint>(r#"{"url":"https://h/p","secret":"whsec_!!"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid base64"), "{err}");
        let err =
            serde_json::from_str::<Endpoint>(r#"{"url":"https://h/p","event":[]}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
