//! Admission: an in-flight slot per request (held until its response body
//! ends), and the client's token turned into a [`Client`].

use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use proxypal_keypool::Secret;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The request-id header. The gateway reads it for its log lines; a front
/// that sets it (the server accepts the client's or makes one) gets it
/// forwarded upstream with the rest of the client's headers.
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Who sent a request, as far as the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Client {
    /// No client tokens are configured: everyone is served, anonymously.
    Open,
    /// The client presented the configured token at this position.
    Token(usize),
}

/// Client tokens, compared in constant time.
#[derive(Default)]
pub struct ClientTokens(Vec<Box<[u8]>>);

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTokens({} tokens)", self.0.len())
    }
}

impl ClientTokens {
    /// The tokens clients must present (none: every client is served).
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a Secret>) -> Self {
        Self(tokens.into_iter().map(|t| t.expose().as_bytes().into()).collect())
    }

    /// Whether tokens are required at all.
    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    /// The client behind `presented`, or `None` if it matches no token.
    /// Every token is compared fully, whatever matches, so timing tells
    /// nothing about which token or which prefix was right.
    pub fn identify(&self, presented: &[u8]) -> Option<Client> {
        if !self.required() {
            return Some(Client::Open);
        }
        let mut found = None;
        for (i, token) in self.0.iter().enumerate() {
            if constant_time_eq(token, presented) {
                found = Some(Client::Token(i));
            }
        }
        found
    }

    /// The client named by `headers` (`Authorization: Bearer <token>`), or
    /// `None` when a token is required and missing or wrong.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Client> {
        if !self.required() {
            return Some(Client::Open); // without a header lookup
        }
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        self.identify(presented)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The in-flight cap: a slot per request, released when the slot (kept in the
/// response body) is dropped, so a stream holds its slot until it ends.
#[derive(Debug)]
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    max: usize,
}

/// An admitted request's slot; dropping it frees the slot.
pub(crate) type Slot = OwnedSemaphorePermit;

impl Admission {
    /// At most `max` requests at once (at least 1).
    pub(crate) fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self { slots: Arc::new(Semaphore::new(max)), max }
    }

    /// A slot now, or `None` when `max` requests are in flight.
    pub(crate) fn admit(&self) -> Option<Slot> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// Requests being served now.
    pub(crate) fn in_flight(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn tokens_identify_clients() {
        let secrets = [Secret::new("one"), Secret::new("two")];
        let tokens = ClientTokens::new(&secrets);
        assert_eq!(tokens.identify(b"two"), Some(Client::Token(1)));
        assert_eq!(tokens.identify(b"one"), Some(Client::Token(0)));
        assert_eq!(tokens.identify(b"three"), None);
        assert_eq!(tokens.identify(b""), None);
        let mut headers = HeaderMap::new();
        assert_eq!(tokens.authenticate(&headers), None);
        headers.insert(AUTHORIZATION, http::HeaderValue::from_static("Bearer one"));
        assert_eq!(tokens.authenticate(&headers), Some(Client::Token(0)));
        headers.insert(AUTHORIZATION, http::HeaderValue::from_static("Basic one"));
        assert_eq!(tokens.authenticate(&headers), None);
        assert_eq!(ClientTokens::default().authenticate(&headers), Some(Client::Open));
    }

    #[test]
    fn slots_are_freed_by_drop() {
        let admission = Admission::new(2);
        let a = admission.admit().unwrap();
        let _b = admission.admit().unwrap();
        assert_eq!(admission.in_flight(), 2);
        assert!(admission.admit().is_none());
        drop(a);
        assert_eq!(admission.in_flight(), 1);
        assert!(admission.admit().is_some());
    }
}
