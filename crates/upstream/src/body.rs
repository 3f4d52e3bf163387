//! [`UpstreamBody`]: the response body, forwarded frame by frame with an idle timeout.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::{UpstreamBodyError, pool::Lent};

/// The upstream response body.
///
/// Each frame is passed on the moment hyper yields it: nothing is buffered or coalesced, so
/// server-sent events reach the client chunk by chunk. `size_hint` and `is_end_stream` are
/// forwarded, so a `Content-Length` response keeps its framing downstream.
///
/// If no frame arrives for [`idle_timeout`](crate::UpstreamConfig::idle_timeout) (counted from
/// the response headers, then from each frame), the body yields
/// [`UpstreamBodyError::IdleTimeout`] and ends.
///
/// Dropping it closes the upstream HTTP/1 connection (or resets the HTTP/2 stream) unless the
/// body was read to the end, in which case the connection returns to the pool (at the moment
/// the last frame is read, or at once for an empty body).
///
/// It is [`Unpin`], so `http_body_util::BodyExt::frame` works on it directly.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    // Created on the first poll that has to wait: a response whose body is already buffered
    // (the usual non-streaming answer) never needs a timer. Boxed to keep the body `Unpin`.
    // The deadline is moved lazily: a frame only records `last_frame`, and the timer is
    // re-armed when it fires early, which keeps a timer-wheel update off every SSE chunk.
    idle: Option<Pin<Box<Sleep>>>,
    last_frame: Instant,
    idle_timeout: Duration,
    done: bool,
    /// The HTTP/1.1 connection this body arrives on, returned to the pool at the end.
    lent: Option<Lent>,
}

impl UpstreamBody {
    /// Wraps hyper's body; the idle clock starts now. `lent` goes back to the pool when the
    /// body has been read to the end.
    pub(crate) fn new(inner: Incoming, idle_timeout: Duration, lent: Option<Lent>) -> Self {
        let now = Instant::now();
        let mut body = Self { inner, idle: None, last_frame: now, idle_timeout, done: false, lent };
        // A body known to be empty may never be polled (hyper's server does not poll a body
        // whose `is_end_stream` is true).
        body.give_back_if_ended();
        body
    }

    /// Returns the connection once hyper says the body has ended: after the last frame of a
    /// `Content-Length` body nobody may poll again, so waiting for `Ready(None)` could keep
    /// the connection out of the pool for good.
    fn give_back_if_ended(&mut self) {
        if self.lent.is_some() && self.inner.is_end_stream() {
            if let Some(lent) = self.lent.take() {
                lent.give_back();
            }
        }
    }
}

/// `from + timeout`, saturating far in the future instead of overflowing.
fn deadline(from: Instant, timeout: Duration) -> Instant {
    from.checked_add(timeout)
        // ~30 years is tokio's own stand-in for "never"; `from` itself is unreachable in practice.
        .or_else(|| from.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(from)
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = Instant::now();
                this.give_back_if_ended();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                // Broken: the connection is dropped (closed), not returned.
                this.lent = None;
                return Poll::Ready(Some(Err(UpstreamBodyError::Read { source: e.into() })));
            }
            Poll::Ready(None) => {
                this.done = true;
                if let Some(lent) = this.lent.take() {
                    lent.give_back();
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let (last_frame, timeout) = (this.last_frame, this.idle_timeout);
        let idle = this
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline(last_frame, timeout))));
        loop {
            ready!(idle.as_mut().poll(cx));
            let due = deadline(this.last_frame, this.idle_timeout);
            if due <= Instant::now() {
                this.done = true;
                return Poll::Ready(Some(Err(UpstreamBodyError::IdleTimeout { after: this.idle_timeout })));
            }
            // A frame arrived since the timer was armed: re-arm it and poll again to register.
            idle.as_mut().reset(due);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}
