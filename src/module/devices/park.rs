//! Parking an idle command channel: what lets ws.rs drop tungstenite's
//! state (its read and write buffers, its wakers) while a channel waits
//! for the device, and hold only the stream.
//!
//! tungstenite keeps bytes it has read but not yet used in its own buffer,
//! which it does not expose, so it cannot be dropped at just any time
//! without losing input. [`FrameGate`] sits between it and the stream and
//! never hands it bytes past the end of a WebSocket frame: it reads each
//! frame header itself (2 bytes, then the 0 to 12 more that the first two
//! announce), passes it on, then lets through at most the frame's payload
//! length. So whenever the gate is between frames, everything tungstenite
//! was given made whole frames, which it has consumed; and outside a
//! fragmented message it holds no partial message either.
//! [`FrameGate::at_rest`] says so, and then tungstenite can be dropped and
//! later rebuilt over the same gate (the caller flushes its writes first).
//!
//! While parked, [`FrameGate::poll_input`] waits for the device's next
//! bytes by reading the start of the next frame header into the gate's
//! own 14 bytes, from where the rebuilt tungstenite gets them.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEAD: usize = 14;

pub struct FrameGate<S> {
    inner: S,
    /// The current frame's header as read so far.
    head: [u8; MAX_HEAD],
    /// Header bytes read (`have`) and handed on (`served`).
    have: u8,
    served: u8,
    /// Payload bytes of the current frame not yet handed on.
    payload: u64,
    /// Inside a fragmented message: its final frame is still to come.
    fragmented: bool,
    /// The stream ended (reads give nothing from now on).
    eof: bool,
}

impl<S> FrameGate<S> {
    pub fn new(inner: S) -> FrameGate<S> {
        FrameGate {
            inner,
            head: [0; MAX_HEAD],
            have: 0,
            served: 0,
            payload: 0,
            fragmented: false,
            eof: false,
        }
    }

    /// Between two frames, outside a fragmented message, with no byte of
    /// the next frame read: whatever reads through the gate holds no
    /// unread input and no partial message.
    pub fn at_rest(&self) -> bool {
        self.have == 0 && self.payload == 0 && !self.fragmented
    }

    /// Header bytes needed: 2, then as many as the first two announce.
    fn head_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let b = self.head[1];
        let ext = match b & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if b & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn head_complete(&self) -> bool {
        self.have >= 2 && usize::from(self.have) == self.head_len()
    }

    /// The header was handed on: its payload comes next.
    fn begin_payload(&mut self) {
        let h = &self.head;
        self.payload = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        let fin = h[0] & 0x80 != 0;
        // Data (1 text, 2 binary) and continuation (0) frames; control
        // frames (8 and up) may come between the fragments of a message.
        if h[0] & 0x0f < 8 {
            self.fragmented = !fin;
        }
        if self.payload == 0 {
            self.end_frame();
        }
    }

    fn end_frame(&mut self) {
        self.have = 0;
        self.served = 0;
    }
}

impl<S: AsyncRead + Unpin> FrameGate<S> {
    /// Read more of the current header into `head` (at least one byte
    /// unless the stream ended).
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let want = self.head_len();
        let mut rb = ReadBuf::new(&mut self.head[usize::from(self.have)..want]);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            self.eof = true;
        }
        self.have += n as u8;
        Poll::Ready(Ok(()))
    }

    /// Ready once the device sent something (or the stream ended or
    /// failed): the parked wait. What was read stays in the gate.
    pub fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.have > 0 || self.payload > 0 || self.eof {
            return Poll::Ready(Ok(()));
        }
        self.poll_head(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.served < this.have && this.head_complete() {
                let from = usize::from(this.served);
                let n = (usize::from(this.have) - from).min(buf.remaining());
                buf.put_slice(&this.head[from..from + n]);
                this.served += n as u8;
                if this.served == this.have {
                    this.begin_payload();
                }
                return Poll::Ready(Ok(()));
            }
            if this.payload > 0 {
                let limit = usize::try_from(this.payload)
                    .unwrap_or(usize::MAX)
                    .min(buf.remaining());
                // Free when `buf` is initialised already (tungstenite's
                // is: it reads into a zero-filled slice).
                let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                let n = part.filled().len();
                buf.advance(n);
                if n == 0 {
                    this.eof = true;
                }
                this.payload -= n as u64;
                if this.payload == 0 {
                    this.end_frame();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_head(cx))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    use super::FrameGate;

    type Ws = WebSocketStream<FrameGate<DuplexStream>>;

    /// tungstenite set up over the gate, as a parked channel is woken: it
    /// waits for input first.
    async fn unpark(mut gate: FrameGate<DuplexStream>) -> Ws {
        poll_fn(|cx| gate.poll_input(cx)).await.unwrap();
        let config = WebSocketConfig::default()
            .read_buffer_size(64)
            .write_buffer_size(0);
        WebSocketStream::from_raw_socket(gate, Role::Server, Some(config)).await
    }

    async fn park(mut ws: Ws) -> FrameGate<DuplexStream> {
        assert!(ws.get_ref().at_rest());
        ws.flush().await.unwrap();
        ws.into_inner()
    }

    /// Messages sent back to back, so the next frame's bytes are always
    /// there to be read, and taken one at a time by a tungstenite set up
    /// anew for each over the same gate: none is lost or mangled, whatever
    /// the header length (7-bit, 16-bit and 64-bit lengths, masked) and
    /// however the bytes arrive (a 7-byte pipe splits every header).
    #[tokio::test]
    async fn tungstenite_set_up_anew_between_frames_loses_nothing() {
        const SIZES: [usize; 9] = [0, 1, 125, 126, 200, 65535, 65536, 70_000, 3];
        let text = |i: usize| char::from(b'a' + i as u8).to_string().repeat(SIZES[i]);
        for pipe in [7, 256 * 1024] {
            let (client, server) = tokio::io::duplex(pipe);
            let device = tokio::spawn(async move {
                let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
                for i in 0..SIZES.len() {
                    ws.feed(Message::text(text(i))).await.unwrap();
                }
                ws.flush().await.unwrap();
                ws
            });
            let mut gate = FrameGate::new(server);
            for i in 0..SIZES.len() {
                let mut ws = unpark(gate).await;
                let got = ws.next().await.unwrap().unwrap().into_text().unwrap();
                assert!(
                    got.as_str() == text(i),
                    "pipe {pipe}, message {i}: {} bytes",
                    got.len()
                );
                gate = park(ws).await;
            }
            drop(device.await.unwrap());
        }
    }

    /// A fragmented message with a ping between its frames: the gate is
    /// not at rest until its last frame, and the message arrives whole.
    #[tokio::test]
    async fn not_at_rest_inside_a_fragmented_message() {
        let (client, server) = tokio::io::duplex(1024);
        let mut device = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let first = Frame::message(&b"hel"[..], OpCode::Data(Data::Text), false);
        let last = Frame::message(&b"lo"[..], OpCode::Data(Data::Continue), true);
        device.feed(Message::Frame(first)).await.unwrap();
        device.feed(Message::Ping("p".into())).await.unwrap();
        device.feed(Message::Frame(last)).await.unwrap();
        device.flush().await.unwrap();

        let mut ws = unpark(FrameGate::new(server)).await;
        assert!(matches!(ws.next().await, Some(Ok(Message::Ping(_)))));
        assert!(!ws.get_ref().at_rest(), "inside a fragmented message");
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), "hello");
        // The pong tungstenite owes goes out before it is dropped.
        let _ = park(ws).await;
        assert!(matches!(device.next().await, Some(Ok(Message::Pong(_)))));
    }

    /// The device hangs up while the channel is parked: the wait ends, and
    /// tungstenite set up again sees the end of the stream.
    #[tokio::test]
    async fn a_hang_up_while_parked_ends_the_wait() {
        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        let mut ws = unpark(FrameGate::new(server)).await;
        assert!(!matches!(ws.next().await, Some(Ok(_))));
    }
}
