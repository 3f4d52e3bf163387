//! Which requests the cache serves or stores, decided per request.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::CacheError;
use crate::key::{CacheKey, Endpoint, Owner};

/// The cache's settings (`cache.*`), with the defaults of the issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long an entry is served after it was stored (`cache.ttl`,
    /// default 1 h).
    pub ttl: Duration,
    /// The memory store's bound, entries and their bookkeeping together
    /// (`cache.max_bytes`, default 64 MiB).
    pub max_bytes: u64,
    /// The largest answer stored (`cache.max_entry_bytes`, default 1 MiB):
    /// a stream is given up on once it passes this, and a Redis value never
    /// exceeds it.
    pub max_entry_bytes: u64,
    /// One entry for every client asking the same (`cache.shared_between_clients`,
    /// default false: each client has its own).
    pub shared_between_clients: bool,
    /// Also cache requests that ask for samples, `temperature` above 0 or
    /// `n` above 1 (`cache.cache_sampled`, default false).
    pub cache_sampled: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3_600),
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            shared_between_clients: false,
            cache_sampled: false,
        }
    }
}

impl CacheSettings {
    /// Checks that every bound is usable.
    ///
    /// # Errors
    /// [`CacheError::Invalid`] naming the field: a zero `ttl`, `max_bytes`
    /// or `max_entry_bytes`.
    pub fn validate(&self) -> Result<(), CacheError> {
        let invalid = |field, reason: &str| Err(CacheError::Invalid { field, reason: reason.to_owned() });
        if self.ttl.is_zero() {
            return invalid("cache.ttl", "must be more than zero");
        }
        if self.max_bytes == 0 {
            return invalid("cache.max_bytes", "must be more than zero");
        }
        if self.max_entry_bytes == 0 {
            return invalid("cache.max_entry_bytes", "must be more than zero");
        }
        Ok(())
    }
}

/// Why a request neither reads nor uses the cache as usual.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The client sent `Cache-Control: no-store`: not read, not stored.
    NoStore,
    /// The client sent `Cache-Control: no-cache`: not read, but the fresh
    /// answer is stored (only ever the reason of a [`Decision::Refresh`]).
    NoCache,
    /// `temperature` above 0 or `n` above 1, and `cache.cache_sampled` is
    /// off: the client asked for a different answer each time.
    Sampled,
    /// The body is not a JSON object.
    NotJson,
}

impl Reason {
    /// A short label for logs and metrics (`no-store`, `no-cache`,
    /// `sampled`, `not-json`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoStore => "no-store",
            Self::NoCache => "no-cache",
            Self::Sampled => "sampled",
            Self::NotJson => "not-json",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go upstream as if there were no cache, and store nothing
    /// (`x-proxypal-cache: bypass`).
    Bypass(Reason),
    /// Look `key` up; on a miss go upstream and store a complete, successful
    /// answer under it.
    Use {
        /// Where the answer is filed.
        key: CacheKey,
        /// The body says `"stream": true`: the answer is an SSE stream.
        stream: bool,
    },
    /// `Cache-Control: no-cache`: go upstream without looking, then store
    /// the fresh answer under `key` (like an HTTP revalidation that always
    /// fetches), so that the next client gets it. Reported as a bypass.
    Refresh {
        /// Where the answer is filed.
        key: CacheKey,
        /// The body says `"stream": true`.
        stream: bool,
    },
}

impl Decision {
    /// The key, unless bypassed.
    pub fn key(&self) -> Option<CacheKey> {
        match self {
            Self::Bypass(_) => None,
            Self::Use { key, .. } | Self::Refresh { key, .. } => Some(*key),
        }
    }

    /// The cache is looked up ([`Use`](Self::Use) only).
    pub fn looks_up(&self) -> bool {
        matches!(self, Self::Use { .. })
    }

    /// A complete, successful answer is stored ([`Use`](Self::Use) and
    /// [`Refresh`](Self::Refresh)).
    pub fn stores(&self) -> bool {
        !matches!(self, Self::Bypass(_))
    }

    /// The request asks for a stream (false when bypassed: nothing to know).
    pub fn stream(&self) -> bool {
        match self {
            Self::Bypass(_) => false,
            Self::Use { stream, .. } | Self::Refresh { stream, .. } => *stream,
        }
    }

    /// Why the lookup is skipped: the bypass's reason, or
    /// [`Reason::NoCache`] for a refresh; `None` for [`Use`](Self::Use).
    pub fn bypass_reason(&self) -> Option<Reason> {
        match self {
            Self::Bypass(reason) => Some(*reason),
            Self::Refresh { .. } => Some(Reason::NoCache),
            Self::Use { .. } => None,
        }
    }
}

/// Decides, per request, whether the cache is read and written, and under
/// which key.
///
/// # What is cached
///
/// - `Cache-Control: no-store` (any case, among other directives, with or
///   without a `=value`) bypasses the cache both ways.
/// - `Cache-Control: no-cache` skips the lookup but stores the fresh answer
///   ([`Decision::Refresh`]): the client wants a new answer, not that nobody
///   else may have it. `no-store` wins when both are sent.
/// - `temperature` above 0 or `n` above 1 asks for a sample: not cached
///   unless [`CacheSettings::cache_sampled`]. A `temperature` or `n` that is
///   not a number is treated as sampled (the upstream will likely refuse it
///   anyway).
/// - **An absent (or `null`) `temperature` is cacheable**, although the
///   upstream's default may be above 0 (OpenAI's is 1): clients that want
///   variety say so, the cache is off unless an operator turns it on, and
///   caching only requests that spell out `temperature: 0` would leave most
///   of what clients send uncached. The same for an absent `n` (default 1).
/// - A body that is not a JSON object is not cached.
#[derive(Debug, Clone)]
pub struct Policy {
    settings: CacheSettings,
}

impl Policy {
    /// The policy of `settings`.
    pub fn new(settings: CacheSettings) -> Self {
        Self { settings }
    }

    /// Its settings.
    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// What to do with a request to `endpoint` for `public_model` (the name
    /// the client asked for) with `body`, from the client named `client`
    /// (`None`: no configured client; never a token), which sent
    /// `cache_control` (every `Cache-Control` header value, joined with
    /// commas when there are several).
    ///
    /// `body` should be what the upstream is sent (or what the client sent,
    /// as long as the gateway always passes the same one): the key is the
    /// request as the upstream sees it.
    pub fn decide(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        public_model: &str,
        client: Option<&str>,
        cache_control: Option<&str>,
    ) -> Decision {
        let control = cache_control.map(CacheControl::parse).unwrap_or_default();
        if control.no_store {
            return Decision::Bypass(Reason::NoStore);
        }
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
            return Decision::Bypass(Reason::NotJson);
        };
        if !self.settings.cache_sampled && sampled(&map) {
            return Decision::Bypass(Reason::Sampled);
        }
        let owner = match (self.settings.shared_between_clients, client) {
            (true, _) => Owner::Shared,
            (false, Some(name)) => Owner::Client(name),
            (false, None) => Owner::Anonymous,
        };
        let key = CacheKey::from_object(endpoint, public_model, owner, &map);
        let stream = matches!(map.get("stream"), Some(Value::Bool(true)));
        if control.no_cache { Decision::Refresh { key, stream } } else { Decision::Use { key, stream } }
    }
}

/// `temperature` above 0 or `n` above 1 (absent or null: the default, not
/// sampled; anything but a number: sampled).
fn sampled(body: &Map<String, Value>) -> bool {
    let above = |field: &str, limit: f64| match body.get(field) {
        None | Some(Value::Null) => false,
        Some(Value::Number(n)) => n.as_f64().is_none_or(|v| v > limit),
        Some(_) => true,
    };
    above("temperature", 0.0) || above("n", 1.0)
}

/// The `Cache-Control` directives the cache obeys.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CacheControl {
    no_cache: bool,
    no_store: bool,
}

impl CacheControl {
    /// Comma-separated directives, names compared without case, `=value`
    /// parts (quoted strings included, commas inside them too) ignored.
    fn parse(value: &str) -> Self {
        let mut out = Self::default();
        let mut see = |directive: &str| {
            let name = directive.split('=').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("no-store") {
                out.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                out.no_cache = true;
            }
        };
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in value.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    see(&value[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        see(&value[start..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = r#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#;

    fn policy() -> Policy {
        Policy::new(CacheSettings::default())
    }

    fn decide(p: &Policy, body: &str, client: Option<&str>, cc: Option<&str>) -> Decision {
        p.decide(Endpoint::ChatCompletions, body.as_bytes(), "llama", client, cc)
    }

    #[test]
    fn defaults_are_the_issues() {
        let s = CacheSettings::default();
        assert_eq!(s.ttl, Duration::from_secs(3600));
        assert_eq!(s.max_bytes, 64 * 1024 * 1024);
        assert_eq!(s.max_entry_bytes, 1024 * 1024);
        assert!(!s.shared_between_clients && !s.cache_sampled);
        assert!(s.validate().is_ok());
        let zero = CacheSettings { ttl: Duration::ZERO, ..CacheSettings::default() };
        let err = zero.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cache.ttl"), "{err}");
        let zero = CacheSettings { max_entry_bytes: 0, ..CacheSettings::default() };
        assert!(matches!(zero.validate(), Err(CacheError::Invalid { field: "cache.max_entry_bytes", .. })));
    }

    #[test]
    fn cache_control_table() {
        let p = policy();
        // (header, expected decision kind)
        let cases: &[(Option<&str>, &str)] = &[
            (None, "use"),
            (Some(""), "use"),
            (Some("max-age=0"), "use"),
            (Some("no-store"), "no-store"),
            (Some("No-Store"), "no-store"),
            (Some("  NO-STORE  "), "no-store"),
            (Some("private, no-store"), "no-store"),
            (Some("no-store=\"x\""), "no-store"),
            (Some("no-cache"), "refresh"),
            (Some("No-Cache"), "refresh"),
            (Some("max-age=0,no-cache"), "refresh"),
            (Some("no-cache=\"set-cookie, authorization\""), "refresh"),
            (Some("no-cache, no-store"), "no-store"),
            (Some("no-store, no-cache"), "no-store"),
            // Inside a quoted value it is not a directive.
            (Some("private=\"a, no-store\""), "use"),
            (Some("private=\"a\\\", no-store\""), "use"),
            (Some("no-storex, xno-cache"), "use"),
        ];
        for (header, want) in cases {
            let got = match decide(&p, CHAT, Some("a"), *header) {
                Decision::Use { .. } => "use",
                Decision::Refresh { .. } => "refresh",
                Decision::Bypass(Reason::NoStore) => "no-store",
                other => panic!("{header:?}: {other:?}"),
            };
            assert_eq!(got, *want, "{header:?}");
        }
    }

    #[test]
    fn a_refresh_stores_under_the_same_key_a_lookup_reads() {
        let p = policy();
        let use_ = decide(&p, CHAT, Some("a"), None);
        let refresh = decide(&p, CHAT, Some("a"), Some("no-cache"));
        assert_eq!(use_.key(), refresh.key());
        assert!(use_.looks_up() && use_.stores() && use_.bypass_reason().is_none());
        assert!(!refresh.looks_up() && refresh.stores());
        assert_eq!(refresh.bypass_reason(), Some(Reason::NoCache));
        let store = decide(&p, CHAT, Some("a"), Some("no-store"));
        assert!(!store.looks_up() && !store.stores() && store.key().is_none());
    }

    #[test]
    fn sampling_table() {
        let p = policy();
        let sampled_too = Policy::new(CacheSettings { cache_sampled: true, ..CacheSettings::default() });
        // (extra members, cacheable by default)
        let cases: &[(&str, bool)] = &[
            ("", true),
            (r#","temperature":0"#, true),
            (r#","temperature":0.0"#, true),
            (r#","temperature":-0.0"#, true),
            (r#","temperature":null"#, true),
            (r#","temperature":0.01"#, false),
            (r#","temperature":1"#, false),
            (r#","temperature":"0""#, false),
            (r#","n":1"#, true),
            (r#","n":1.0"#, true),
            (r#","n":null"#, true),
            (r#","n":2"#, false),
            (r#","n":"1""#, false),
            (r#","temperature":0,"n":3"#, false),
            (r#","top_p":0.5"#, true),
        ];
        for (extra, cacheable) in cases {
            let body = format!(r#"{{"model":"llama","messages":[]{extra}}}"#);
            let got = decide(&p, &body, None, None);
            assert_eq!(got.looks_up(), *cacheable, "{body}: {got:?}");
            if !cacheable {
                assert_eq!(got, Decision::Bypass(Reason::Sampled), "{body}");
            }
            assert!(decide(&sampled_too, &body, None, None).looks_up(), "cache_sampled: {body}");
        }
    }

    #[test]
    fn stream_is_read_from_the_body() {
        let p = policy();
        let s = |body: &str| decide(&p, body, None, None).stream();
        assert!(s(r#"{"stream":true,"messages":[]}"#));
        assert!(!s(r#"{"stream":false,"messages":[]}"#));
        assert!(!s(r#"{"messages":[]}"#));
        assert!(!s(r#"{"stream":"true","messages":[]}"#));
        // A stream and a plain answer are different entries.
        assert_ne!(
            decide(&p, r#"{"stream":true,"messages":[]}"#, None, None).key(),
            decide(&p, r#"{"messages":[]}"#, None, None).key()
        );
    }

    #[test]
    fn not_json_objects_bypass() {
        let p = policy();
        for body in ["", "not json", "[1,2]", "{\"a\":", "42"] {
            assert_eq!(decide(&p, body, None, None), Decision::Bypass(Reason::NotJson), "{body:?}");
        }
    }

    #[test]
    fn clients_have_their_own_entries_unless_shared() {
        let own = policy();
        let a = decide(&own, CHAT, Some("a"), None).key();
        let b = decide(&own, CHAT, Some("b"), None).key();
        let anonymous = decide(&own, CHAT, None, None).key();
        assert_ne!(a, b);
        assert_ne!(a, anonymous);
        let shared = Policy::new(CacheSettings { shared_between_clients: true, ..CacheSettings::default() });
        let a = decide(&shared, CHAT, Some("a"), None).key();
        assert_eq!(a, decide(&shared, CHAT, Some("b"), None).key());
        assert_eq!(a, decide(&shared, CHAT, None, None).key());
    }

    #[test]
    fn reasons_have_labels() {
        let labels: Vec<_> =
            [Reason::NoStore, Reason::NoCache, Reason::Sampled, Reason::NotJson].map(Reason::as_str).into();
        assert_eq!(labels, ["no-store", "no-cache", "sampled", "not-json"]);
        assert_eq!(Reason::Sampled.to_string(), "sampled");
    }
}
