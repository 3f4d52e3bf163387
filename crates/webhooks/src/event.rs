//! What can happen ([`EventKind`]) and one occurrence of it ([`Event`]).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The kinds of change ProxyPal notifies about; in configuration and payloads they are
/// spelled as [`EventKind::as_str`] returns (`key.disabled`, `pool.exhausted`, …).
///
/// Two pairs describe states that last (a key disabled until it recovers, a pool exhausted
/// until it recovers); the other two happen once per quota window. See
/// [`Webhooks::emit`](crate::Webhooks::emit) for how that shapes deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `key.disabled`: a key was taken out of rotation (rejected, repeatedly failing).
    KeyDisabled,
    /// `key.recovered`: a disabled key is back in rotation.
    KeyRecovered,
    /// `pool.exhausted`: no key of a provider can serve a request.
    PoolExhausted,
    /// `pool.recovered`: an exhausted pool has a usable key again.
    PoolRecovered,
    /// `quota.warning`: a budget passed its warning threshold (80 %) in the current window.
    QuotaWarning,
    /// `client.quota_exhausted`: a client spent its own quota for the current window.
    ClientQuotaExhausted,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 6] = [
        EventKind::KeyDisabled,
        EventKind::KeyRecovered,
        EventKind::PoolExhausted,
        EventKind::PoolRecovered,
        EventKind::QuotaWarning,
        EventKind::ClientQuotaExhausted,
    ];

    /// The wire name: the payload's `type` and the name in an endpoint's `events` list.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::KeyDisabled => "key.disabled",
            EventKind::KeyRecovered => "key.recovered",
            EventKind::PoolExhausted => "pool.exhausted",
            EventKind::PoolRecovered => "pool.recovered",
            EventKind::QuotaWarning => "quota.warning",
            EventKind::ClientQuotaExhausted => "client.quota_exhausted",
        }
    }

    /// Position in [`EventKind::ALL`], for per-kind tables.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// A one-bit mask, for sets of kinds.
    pub(crate) const fn bit(self) -> u8 {
        1 << self.index()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event name that is not one of [`EventKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown webhook event '{name}' (expected one of: key.disabled, key.recovered, \
     pool.exhausted, pool.recovered, quota.warning, client.quota_exhausted)"
)]
pub struct ParseEventKindError {
    /// The name that was given.
    pub name: String,
}

impl FromStr for EventKind {
    type Err = ParseEventKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ParseEventKindError { name: s.to_owned() })
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = Cow::<'de, str>::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// One occurrence of an [`EventKind`], with what identifies its subject and the figures
/// that describe it.
///
/// ```
/// use proxypal_webhooks::{Event, EventKind};
/// use serde_json::json;
///
/// let event = Event::new(EventKind::QuotaWarning)
///     .provider("nvidia")
///     .key("nvidia-3")
///     .figure("remaining", json!(200))
///     .figure("limit", json!(1000))
///     .figure("window", json!("day"))
///     .figure("resets_at", json!("2026-11-04T00:00:00Z"));
/// assert_eq!(event.data["remaining"], 200);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// When, in Unix milliseconds (UTC); the payload's `timestamp`.
    pub at_ms: i64,
    /// The provider (pool) concerned, if any.
    pub provider: Option<String>,
    /// The key's *name* or masked label, never its secret: the caller guarantees it, and it
    /// is sent to the endpoint as is.
    pub key: Option<String>,
    /// The client concerned (for client quotas), if any.
    pub client: Option<String>,
    /// Figures describing the event (`remaining`, `limit`, `resets_at`, `window`, …); they
    /// become members of the payload's `data` next to `provider`, `key` and `client`.
    pub data: Map<String, Value>,
}

impl Event {
    /// An event of `kind` happening now, with no subject and no figures yet.
    pub fn new(kind: EventKind) -> Self {
        Event { kind, at_ms: now_ms(), provider: None, key: None, client: None, data: Map::new() }
    }

    /// Sets when the event happened (Unix milliseconds) instead of now.
    #[must_use]
    pub fn at_ms(mut self, at_ms: i64) -> Self {
        self.at_ms = at_ms;
        self
    }

    /// Sets the provider concerned.
    #[must_use]
    pub fn provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// Sets the key concerned, by name or masked label (never the secret).
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the client concerned.
    #[must_use]
    pub fn client(mut self, client: impl Into<String>) -> Self {
        self.client = Some(client.into());
        self
    }

    /// Adds (or replaces) one figure of `data`.
    ///
    /// `provider`, `key` and `client` are reserved: in the payload the fields above win over
    /// figures of the same name.
    #[must_use]
    pub fn figure(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.data.insert(name.into(), value.into());
        self
    }
}

/// Wall-clock time in Unix milliseconds (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str_and_serde() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        }
    }

    #[test]
    fn indices_match_all() {
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
    }

    #[test]
    fn an_unknown_name_is_named_with_the_valid_ones() {
        let err = "key.disabld".parse::<EventKind>().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("'key.disabld'"), "{text}");
        for kind in EventKind::ALL {
            assert!(text.contains(kind.as_str()), "{text} lacks {kind}");
        }
        let serde_err =
            serde_json::from_str::<Vec<EventKind>>(r#"["pool.exhausted","nope"]"#).unwrap_err().to_string();
        assert!(serde_err.contains("'nope'"), "{serde_err}");
    }

    #[test]
    fn builder_sets_fields() {
        let e = Event::new(EventKind::KeyDisabled)
            .at_ms(5)
            .provider("p")
            .key("k")
            .client("c")
            .figure("remaining", 3);
        assert_eq!(e.at_ms, 5);
        assert_eq!(e.provider.as_deref(), Some("p"));
        assert_eq!(e.key.as_deref(), Some("k"));
        assert_eq!(e.client.as_deref(), Some("c"));
        assert_eq!(e.data["remaining"], 3);
    }
}
