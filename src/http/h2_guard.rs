//! Bounds on HTTP/2 client connections. The h2 library bounds what it
//! keeps (streams, resets before accept, header blocks with their
//! CONTINUATION frames); what it does not bound is the rate of control
//! frames it answers or acts on: a client sending SETTINGS, PING or
//! RST_STREAM frames without end costs CPU for every one (and with
//! HEADERS, a new handler each: rapid reset, CVE-2023-44487). The
//! connection's read side is watched at frame boundaries here (frame
//! headers only, payloads are skipped), and a client over its budget has
//! its connection closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::server::conn::http2;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::schema::Http2Limits;

/// HTTP/2 bounds of an offload listener (`[listener.http2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Plan {
    pub max_concurrent_streams: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub max_send_buf_size: usize,
    pub control_frame_burst: u32,
    pub control_frames_per_second: u32,
}

impl From<&Http2Limits> for Http2Plan {
    fn from(h: &Http2Limits) -> Self {
        Http2Plan {
            max_concurrent_streams: h.max_concurrent_streams,
            max_pending_accept_reset_streams: h.max_pending_accept_reset_streams,
            max_local_error_reset_streams: h.max_local_error_reset_streams,
            max_send_buf_size: h.max_send_buf_size,
            control_frame_burst: h.control_frame_burst,
            control_frames_per_second: h.control_frames_per_second,
        }
    }
}

impl Default for Http2Plan {
    fn default() -> Self {
        Http2Plan::from(&Http2Limits::default())
    }
}

impl Http2Plan {
    /// The bounds hyper and h2 enforce themselves.
    pub fn apply<E>(&self, builder: &mut http2::Builder<E>) {
        builder
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_pending_accept_reset_streams(self.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(self.max_local_error_reset_streams)
            .max_send_buf_size(self.max_send_buf_size);
    }
}

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Follows the client's byte stream frame by frame and spends a token
/// per control frame from a bucket of `burst` refilled at `per_second`.
#[derive(Debug)]
pub struct ControlFrameBudget {
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload_left: usize,
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled: Instant,
}

impl ControlFrameBudget {
    pub fn new(plan: &Http2Plan) -> Self {
        ControlFrameBudget {
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            tokens: f64::from(plan.control_frame_burst),
            burst: f64::from(plan.control_frame_burst),
            per_second: f64::from(plan.control_frames_per_second),
            refilled: Instant::now(),
        }
    }

    /// Account for bytes read from the client; `false` once the client
    /// has sent more control frames than its budget.
    pub fn read(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let skip = if self.preface_left > 0 {
                let n = self.preface_left.min(data.len());
                self.preface_left -= n;
                n
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                n
            } else {
                let n = (FRAME_HEADER_LEN - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                if self.header_len == FRAME_HEADER_LEN {
                    self.header_len = 0;
                    let h = &self.header;
                    self.payload_left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let control = match h[3] {
                        RST_STREAM => true,
                        SETTINGS | PING => h[4] & ACK == 0,
                        _ => false,
                    };
                    if control && !self.spend() {
                        return false;
                    }
                }
                n
            };
            data = &data[skip..];
        }
        true
    }

    fn spend(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// A server connection's stream with its client's control frames
/// counted; reading fails once the budget is spent, which ends hyper's
/// connection.
pub struct Guarded<IO> {
    io: IO,
    budget: ControlFrameBudget,
    tripped: IntCounter,
}

impl<IO> Guarded<IO> {
    pub fn new(io: IO, plan: &Http2Plan, tripped: IntCounter) -> Self {
        Guarded {
            io,
            budget: ControlFrameBudget::new(plan),
            tripped,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if !this.budget.read(&buf.filled()[before..]) {
                this.tripped.inc();
                return Poll::Ready(Err(io::Error::other(
                    "HTTP/2 client sent control frames faster than allowed",
                )));
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn plan(burst: u32) -> Http2Plan {
        Http2Plan {
            control_frame_burst: burst,
            control_frames_per_second: 1,
            ..Http2Plan::default()
        }
    }

    #[test]
    fn counts_control_frames_across_split_reads() {
        let mut b = ControlFrameBudget::new(&plan(10));
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // DATA frames, SETTINGS ACKs and PING ACKs are free; a DATA
        // payload that looks like frame headers is skipped.
        for _ in 0..50 {
            stream.extend(frame(0x0, 0, &frame(SETTINGS, 0, &[])));
            stream.extend(frame(SETTINGS, ACK, &[]));
            stream.extend(frame(PING, ACK, &[0; 8]));
        }
        for _ in 0..10 {
            stream.extend(frame(RST_STREAM, 0, &[0, 0, 0, 8]));
        }
        // Fed a byte at a time: frame headers split across reads.
        for byte in &stream {
            assert!(b.read(std::slice::from_ref(byte)));
        }
        assert!(!b.read(&frame(SETTINGS, 0, &[])), "the 11th control frame");
    }

    #[test]
    fn the_budget_refills() {
        let mut b = ControlFrameBudget::new(&plan(10));
        assert!(b.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        for _ in 0..10 {
            assert!(b.read(&frame(PING, 0, &[0; 8])));
        }
        b.refilled -= std::time::Duration::from_secs(2);
        assert!(b.read(&frame(PING, 0, &[0; 8])));
        assert!(b.read(&frame(PING, 0, &[0; 8])));
        assert!(!b.read(&frame(PING, 0, &[0; 8])));
    }
}
