//! The relay for proxied WebSockets: bytes flow both ways as in the plain
//! relay (l4/relay.rs: a per-thread scratch buffer, nothing held while
//! idle), and each direction also follows the frame boundaries, reading
//! only frame headers (2 to 14 bytes) and counting payload bytes past.
//! That lets the drain ask both ends to close the way WebSocket says:
//! a Close frame with code 1001 "going away", unmasked toward the client
//! and masked toward the backend, put in at a frame boundary of each
//! direction. Whatever an end sends after that point, up to and including
//! its Close in reply, goes no further (the other end has been told the
//! connection is closing); once both ends have answered, the relay closes
//! both streams.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use prometheus::IntCounter;

use crate::drain::Drain;
use crate::l4::{ByteCounters, PumpEnd, PumpReport};

/// The close code and reason the drain sends on shutdown (1001: going
/// away); an upgrade sends `drain::RESTARTING` instead.
pub const GOING_AWAY: u16 = crate::drain::GOING_AWAY.code;
pub const DRAIN_REASON: &str = crate::drain::GOING_AWAY.reason;

const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

const OP_CLOSE: u8 = 0x8;
const MAX_HEAD: usize = 14;

/// Where a byte stream of WebSocket frames is: inside a header (and how
/// much of it was seen), or inside a payload (and how much is left).
#[derive(Default)]
pub struct FrameCursor {
    head: [u8; MAX_HEAD],
    have: u8,
    payload: u64,
}

impl FrameCursor {
    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload == 0
    }

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
        2 + ext + if b & 0x80 != 0 { 4 } else { 0 }
    }

    /// Follow `data` up to the end of the current piece (header or
    /// payload). Returns the bytes taken, and the opcode of a frame whose
    /// header was completed by them.
    pub fn step(&mut self, data: &[u8]) -> (usize, Option<u8>) {
        if self.payload > 0 {
            let n = usize::try_from(self.payload)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.payload -= n as u64;
            return (n, None);
        }
        let mut taken = 0;
        while taken < data.len() {
            let want = self.head_len();
            let n = (want - usize::from(self.have)).min(data.len() - taken);
            let at = usize::from(self.have);
            self.head[at..at + n].copy_from_slice(&data[taken..taken + n]);
            self.have += n as u8;
            taken += n;
            // The first two bytes may announce more header bytes.
            if usize::from(self.have) == self.head_len() {
                let h = &self.head;
                self.payload = match h[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                    127 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
                    n => u64::from(n),
                };
                let opcode = h[0] & 0x0f;
                self.have = 0;
                return (taken, Some(opcode));
            }
        }
        (taken, None)
    }
}

/// A Close frame with code 1001: masked (client to server) or not.
pub fn going_away_frame(masked: bool) -> Vec<u8> {
    close_frame(masked, crate::drain::GOING_AWAY)
}

/// A Close frame with the drain's code and reason.
pub fn close_frame(masked: bool, why: crate::drain::CloseReason) -> Vec<u8> {
    let mut payload = why.code.to_be_bytes().to_vec();
    payload.extend_from_slice(why.reason.as_bytes());
    let mut frame = vec![0x80 | OP_CLOSE, payload.len() as u8];
    if masked {
        frame[1] |= 0x80;
        let key = fastrand::u32(..).to_be_bytes();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.extend_from_slice(&payload);
    }
    frame
}

/// Bytes moved in one direction, for the idle watchdog and the metric.
struct Progress<'a> {
    moved: AtomicU64,
    metric: &'a IntCounter,
}

impl Progress<'_> {
    fn add(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
    }

    fn get(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
}

/// What both directions share. One task runs both, so the atomics are
/// only there to make the task `Send`.
#[derive(Default)]
struct Shared {
    /// Our Close frames are due.
    close_due: AtomicBool,
    /// A Close frame from an end went through before ours: a close
    /// handshake of the ends' own is under way, nothing is put in.
    ends_closing: AtomicBool,
    /// The drain's code and reason, set when the close falls due.
    reason: std::sync::OnceLock<crate::drain::CloseReason>,
}

impl Shared {
    fn reason(&self) -> crate::drain::CloseReason {
        self.reason
            .get()
            .copied()
            .unwrap_or(crate::drain::GOING_AWAY)
    }

    fn close_due(&self) -> bool {
        self.close_due.load(Ordering::Relaxed)
    }

    fn ends_closing(&self) -> bool {
        self.ends_closing.load(Ordering::Relaxed)
    }
}

/// One direction's frame state.
struct Way {
    frames: FrameCursor,
    /// Our Close went out this way: the sender's later frames are dropped.
    injected: bool,
    /// The sender sent its Close.
    sender_closed: bool,
    /// Toward the backend (frames from a client are masked).
    masked: bool,
}

/// Relay between `client` and `backend` until both ends close, one
/// fails, nothing moves for `idle_timeout`, or, once the drain asked
/// them to go away (at a random moment of its spread), both answered.
pub async fn relay<A, B>(
    client: A,
    backend: B,
    idle_timeout: Duration,
    counters: &ByteCounters,
    drain: &Drain,
) -> PumpReport
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let up = Progress {
        moved: AtomicU64::new(0),
        metric: &counters.upstream,
    };
    let down = Progress {
        moved: AtomicU64::new(0),
        metric: &counters.downstream,
    };
    let shared = Shared::default();
    let (cr, cw) = tokio::io::split(client);
    let (br, bw) = tokio::io::split(backend);
    let a = one_way(cr, bw, &up, &shared, true);
    let b = one_way(br, cw, &down, &shared, false);
    let close_time = async {
        drain.started().await;
        tokio::time::sleep(drain.close_delay()).await;
    };
    tokio::pin!(a, b, close_time);
    let (mut a_done, mut b_done, mut due) = (false, false, false);
    let step = (idle_timeout / 4).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
    let mut seen = 0u64;
    let mut last_move = Instant::now();
    let end = loop {
        tokio::select! {
            r = &mut a, if !a_done => match r {
                Ok(()) => a_done = true,
                Err(e) => break PumpEnd::Error(e),
            },
            r = &mut b, if !b_done => match r {
                Ok(()) => b_done = true,
                Err(e) => break PumpEnd::Error(e),
            },
            // Both directions are polled again on the next turn and put
            // their Close in at their next frame boundary.
            () = &mut close_time, if !due => {
                due = true;
                let _ = shared.reason.set(drain.close_reason());
                shared.close_due.store(true, Ordering::Relaxed);
            }
            _ = tick.tick() => {
                let total = up.get() + down.get();
                if total != seen {
                    seen = total;
                    last_move = Instant::now();
                } else if last_move.elapsed() >= idle_timeout {
                    break PumpEnd::IdleTimeout;
                }
            }
        }
        if a_done && b_done {
            break PumpEnd::Closed;
        }
    };
    PumpReport {
        end,
        upstream_bytes: up.get(),
        downstream_bytes: down.get(),
    }
}

async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    progress: &Progress<'_>,
    shared: &Shared,
    masked: bool,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut way = Way {
        frames: FrameCursor::default(),
        injected: false,
        sender_closed: false,
        masked,
    };
    let mut held: Vec<u8> = Vec::new();
    let mut written = 0usize;
    poll_fn(|cx| loop {
        if written < held.len() {
            let n = ready!(Pin::new(&mut to).poll_write(cx, &held[written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            written += n;
            progress.add(n);
            continue;
        }
        if !held.is_empty() {
            held = Vec::new();
            written = 0;
        }
        ready!(Pin::new(&mut to).poll_flush(cx))?;
        if shared.close_due() {
            if way.sender_closed {
                // The sender said its last word and it went out (or was
                // answered by ours): this direction is finished.
                return Pin::new(&mut to).poll_shutdown(cx);
            }
            if !way.injected && !shared.ends_closing() && way.frames.at_boundary() {
                way.injected = true;
                held = close_frame(way.masked, shared.reason());
                continue;
            }
        }
        match ready!(read_and_write(
            cx, &mut from, &mut to, &mut held, progress, &mut way, shared
        ))? {
            true => {}
            false => return Pin::new(&mut to).poll_shutdown(cx),
        }
    })
    .await
}

/// Read into the scratch buffer, follow the frames, and write what goes
/// on (all of it, unless our Close is put in within these bytes) as far
/// as the writer takes it at once; keep the rest in `held`. Ready(false)
/// at end of stream.
fn read_and_write<R, W>(
    cx: &mut Context<'_>,
    from: &mut R,
    to: &mut W,
    held: &mut Vec<u8>,
    progress: &Progress<'_>,
    way: &mut Way,
    shared: &Shared,
) -> Poll<io::Result<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    SCRATCH_BUF.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut buf = ReadBuf::new(&mut scratch[..]);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut buf))?;
        let data = buf.filled();
        if data.is_empty() {
            return Poll::Ready(Ok(false));
        }
        // What goes on: everything before the point where our Close is
        // put in (or nothing, if it went out before these bytes).
        let mut pass = if way.injected { 0 } else { data.len() };
        let mut inject_here = false;
        let mut pos = 0;
        while pos < data.len() {
            if !way.injected
                && shared.close_due()
                && !shared.ends_closing()
                && way.frames.at_boundary()
            {
                way.injected = true;
                inject_here = true;
                pass = pos;
            }
            let (n, opcode) = way.frames.step(&data[pos..]);
            pos += n;
            if opcode == Some(OP_CLOSE) {
                way.sender_closed = true;
                if !way.injected {
                    shared.ends_closing.store(true, Ordering::Relaxed);
                }
            }
        }
        let data = &data[..pass];
        let sent = if data.is_empty() {
            0
        } else {
            match Pin::new(&mut *to).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            }
        };
        progress.add(sent);
        if sent < data.len() {
            held.extend_from_slice(&data[sent..]);
        }
        if inject_here {
            held.extend_from_slice(&close_frame(way.masked, shared.reason()));
        }
        Poll::Ready(Ok(true))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of every header length, fed in pieces of every size: the
    /// cursor reports each frame's opcode once and ends at its boundary.
    #[test]
    fn the_cursor_finds_every_boundary() {
        let mut stream = Vec::new();
        let mut expect = Vec::new();
        for (len, masked, op) in [
            (0usize, false, 0x9u8),
            (5, true, 0x1),
            (125, false, 0x2),
            (126, true, 0x2),
            (70_000, false, 0x1),
            (30, true, OP_CLOSE),
        ] {
            stream.push(0x80 | op);
            let m = if masked { 0x80 } else { 0 };
            if len < 126 {
                stream.push(m | len as u8);
            } else if len <= 0xffff {
                stream.push(m | 126);
                stream.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                stream.push(m | 127);
                stream.extend_from_slice(&(len as u64).to_be_bytes());
            }
            if masked {
                stream.extend_from_slice(&[1, 2, 3, 4]);
            }
            stream.extend(std::iter::repeat_n(0xaa, len));
            expect.push((stream.len(), op));
        }
        for piece in [1, 2, 3, 7, 100, 1 << 20] {
            let mut cursor = FrameCursor::default();
            let mut got = Vec::new();
            let mut fed = 0;
            for chunk in stream.chunks(piece) {
                let mut pos = 0;
                while pos < chunk.len() {
                    let (n, op) = cursor.step(&chunk[pos..]);
                    assert!(n > 0);
                    pos += n;
                    if let Some(op) = op {
                        got.push(op);
                    }
                    if cursor.at_boundary() {
                        assert!(
                            expect.iter().any(|(end, _)| *end == fed + pos),
                            "boundary at {} is not a frame end",
                            fed + pos
                        );
                    }
                }
                fed += chunk.len();
            }
            assert!(cursor.at_boundary());
            assert_eq!(got, expect.iter().map(|(_, op)| *op).collect::<Vec<_>>());
        }
    }

    #[test]
    fn going_away_frames_decode() {
        let plain = going_away_frame(false);
        assert_eq!(plain[0], 0x88);
        assert_eq!(usize::from(plain[1]), plain.len() - 2);
        assert_eq!(&plain[2..4], &GOING_AWAY.to_be_bytes());
        assert_eq!(&plain[4..], DRAIN_REASON.as_bytes());
        let masked = going_away_frame(true);
        assert_eq!(masked[1] & 0x80, 0x80);
        let key = &masked[2..6];
        let unmasked: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(&unmasked[..], &plain[2..]);
    }
}
