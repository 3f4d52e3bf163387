//! Response bodies: one boxed type for everything the server sends, and a
//! wrapper that ties resources (an in-flight slot, a stream counter) to the
//! body's lifetime so a client that goes away frees them by drop.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Errors a response body can end with (a broken upstream stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the server makes.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pin_project_lite::pin_project! {
    /// Forwards frames of `inner` untouched and holds `guard` until the body
    /// is finished or dropped.
    pub(crate) struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    /// Wraps `inner`, holding `guard` for as long as the body lives.
    pub(crate) fn new(inner: B, guard: G) -> Self {
        Self { inner, guard: Some(guard) }
    }
}

impl<B: Body, G> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // Finished: release now rather than when hyper drops the body.
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
