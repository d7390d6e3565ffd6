//! The pump for streams that are not plain sockets (TLS, upgraded HTTP
//! connections): any `AsyncRead + AsyncWrite` pair. Reads go into a
//! per-thread scratch buffer, so a stream waiting for data holds no buffer
//! at all; only bytes the writer could not take at once are kept, and only
//! until they are written. Idle WebSockets are most of a device fleet.

use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{drive::drive, ByteCounters, Progress, PumpReport};
use crate::scratch;

/// Relay between `a` (the client side) and `b` (the backend side) until
/// both directions end, one fails, or nothing moves for `idle_timeout`.
pub async fn relay<A, B>(a: A, b: B, idle_timeout: Duration, counters: &ByteCounters) -> PumpReport
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = tokio::time::Instant::now();
    let up = Progress::new(&counters.upstream, started);
    let down = Progress::new(&counters.downstream, started);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let mut a = pin!(one_way(ar, bw, &up));
    let mut b = pin!(one_way(br, aw, &down));
    let end = drive(
        |cx| a.as_mut().poll(cx),
        |cx| b.as_mut().poll(cx),
        idle_timeout,
        &up,
        &down,
        // Each direction shuts its writer down itself (a TLS stream says
        // close_notify), so there is nothing left to pass on.
        |_| Ok(()),
    )
    .await;
    PumpReport {
        end,
        upstream_bytes: up.get(),
        downstream_bytes: down.get(),
    }
}

async fn one_way<R, W>(mut from: R, mut to: W, progress: &Progress<'_>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut held: Vec<u8> = Vec::new();
    let mut written = 0usize;
    poll_fn(|cx| loop {
        // Finish what the writer could not take before reading more.
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
        match ready!(read_and_write(cx, &mut from, &mut to, &mut held, progress))? {
            true => {}
            false => return Pin::new(&mut to).poll_shutdown(cx),
        }
    })
    .await
}

/// Read into the scratch buffer and write as much as the writer takes at
/// once; keep the rest in `held`. Ready(false) at end of stream.
fn read_and_write<R, W>(
    cx: &mut Context<'_>,
    from: &mut R,
    to: &mut W,
    held: &mut Vec<u8>,
    progress: &Progress<'_>,
) -> Poll<io::Result<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    scratch::PUMP.with(|scratch| {
        let mut buf = ReadBuf::new(scratch);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut buf))?;
        let data = buf.filled();
        if data.is_empty() {
            return Poll::Ready(Ok(false));
        }
        let sent = match Pin::new(&mut *to).poll_write(cx, data) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => 0,
        };
        progress.add(sent);
        if sent < data.len() {
            held.extend_from_slice(&data[sent..]);
        }
        Poll::Ready(Ok(true))
    })
}
