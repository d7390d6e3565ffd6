//! What an HTTP/1 offload connection and its requests share so the
//! connection loop (`server.rs`) knows when hyper is between requests and
//! can be put away: an idle keep-alive connection then holds only its TLS
//! session, not hyper's read and write buffers (8 KiB each).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};

use super::access;
use super::at_end::EndHook;
use super::upstream::Body;

/// Shared by one connection's loop, its IO wrapper and its requests. All
/// of it is touched from the connection's own task except a request body
/// that ends on a backend connection's task; a late update there only
/// delays putting hyper away until the next request.
#[derive(Default)]
pub struct Activity {
    /// Requests whose response, or whose request body, is not finished.
    busy: AtomicUsize,
    /// Requests started on the current hyper connection.
    started: AtomicUsize,
    /// hyper's state is not known to be "between requests" (an upgrade, a
    /// request body left unread): the connection stays with hyper.
    pinned: AtomicBool,
    /// Bytes handed to the TLS stream and not yet flushed.
    unflushed: AtomicBool,
    /// hyper is being put away: its shutdown must leave the stream open.
    parking: AtomicBool,
}

impl Activity {
    /// A fresh hyper connection is about to take over the stream.
    pub fn start_cycle(&self) {
        self.started.store(0, Relaxed);
        self.parking.store(false, Relaxed);
    }

    /// hyper served at least one request, everything it started is
    /// finished and flushed: it is waiting for the next request head.
    pub fn can_park(&self) -> bool {
        self.started.load(Relaxed) > 0
            && self.busy.load(Relaxed) == 0
            && !self.unflushed.load(Relaxed)
            && !self.pinned.load(Relaxed)
    }

    /// Requests started on the current hyper connection so far.
    pub fn started(&self) -> usize {
        self.started.load(Relaxed)
    }

    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Relaxed);
    }

    pub fn parking(&self) -> bool {
        self.parking.load(Relaxed)
    }

    pub fn wrote(&self) {
        self.unflushed.store(true, Relaxed);
    }

    pub fn flushed(&self) {
        self.unflushed.store(false, Relaxed);
    }

    /// Keep this connection with hyper until it ends.
    pub fn pin(&self) {
        self.pinned.store(true, Relaxed);
    }

    /// A request starts: busy until its response body is dropped by hyper
    /// (sent in full, or abandoned with the connection).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        Busy(self.clone())
    }

    /// A request body that hyper is still reading: busy until it has
    /// been read to its end.
    pub fn watch_body(self: &Arc<Self>) -> BodyWatch {
        self.busy.fetch_add(1, Relaxed);
        BodyWatch(Some(self.clone()))
    }
}

pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
    }
}

/// See [`Activity::watch_body`]. Dropped before the body's end, hyper may
/// still be reading (or draining) that body, so the connection is pinned.
pub struct BodyWatch(Option<Arc<Activity>>);

impl BodyWatch {
    /// Nothing to watch: no body, or not an HTTP/1 connection.
    pub fn none() -> BodyWatch {
        BodyWatch(None)
    }
}

/// A request body forwarded to a backend ends its watch at its end.
impl EndHook for BodyWatch {
    fn ended(&mut self) {
        if let Some(a) = self.0.take() {
            a.busy.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.pinned.store(true, Relaxed);
            a.busy.fetch_sub(1, Relaxed);
        }
    }
}

/// A response body carrying its request's [`Busy`] until hyper drops it,
/// and its access-log entry, written then.
pub struct ResponseBody {
    inner: Body,
    _busy: Option<Busy>,
    entry: access::Slot,
}

impl ResponseBody {
    pub fn new(inner: Body, busy: Option<Busy>, entry: access::Slot) -> ResponseBody {
        ResponseBody {
            inner,
            _busy: busy,
            entry,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(e) = self.entry.take() {
            e.finish(None);
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(e), Poll::Ready(Some(Ok(frame)))) = (&mut this.entry, &polled) {
            if let Some(d) = frame.data_ref() {
                e.bytes_out += d.len() as u64;
            }
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
