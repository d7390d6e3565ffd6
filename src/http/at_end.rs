//! A body wrapper that runs a hook once the wrapped body has yielded its
//! last frame: a request body's end frees its connection for hyper to be
//! put away, a response body's end returns its backend connection to the
//! keep-alive pool. Dropped before its end, the wrapper does not run it.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};

/// What to do when a body has been read to its end; called at most once
/// per body by [`AtEnd`], and must be harmless if called again.
pub trait EndHook: Unpin {
    fn ended(&mut self);

    /// A data frame of `n` bytes went through (for byte counts).
    fn data(&mut self, _n: usize) {}
}

pub struct AtEnd<H: EndHook> {
    inner: Incoming,
    hook: H,
}

impl<H: EndHook> AtEnd<H> {
    pub fn new(inner: Incoming, mut hook: H) -> Self {
        // An empty body yields no frame to notice its end by.
        if inner.is_end_stream() {
            hook.ended();
        }
        AtEnd { inner, hook }
    }
}

impl<H: EndHook> HttpBody for AtEnd<H> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                this.hook.data(d.len());
            }
        }
        match &polled {
            Poll::Ready(None) => this.hook.ended(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.hook.ended(),
            _ => {}
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
