//! Admission: an in-flight slot per request (held until its response body
//! ends), and who sent it ([`Client`]; tokens are checked in `clients`).

use std::sync::Arc;

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
    /// An operator: the configured operator token (`client_tokens`) at
    /// this position.
    Token(usize),
    /// The named client at this position of `clients`.
    Named(usize),
}

/// Whether `a` and `b` are equal, looking at every byte of the longer:
/// the time taken tells nothing about where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
