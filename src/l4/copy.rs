//! One direction of the pump through a user-space buffer: the portable
//! path, and the one used when splice is turned off.
//!
//! Reads go into a per-thread scratch buffer and are written on at once,
//! so a connection holds no buffer while it waits (idle connections are
//! most of a fleet); only bytes the writer could not take right away are
//! copied out, and kept until written.

use std::cell::Cell;
use std::io::{self, Read};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Progress;
use crate::scratch;

pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress<'_>,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        if move_ready(from, to, progress).await? {
            return Ok(());
        }
    }
}

/// What one read-and-write step did.
pub(super) enum Step {
    /// Read and written in full; the socket may have more.
    Moved,
    /// Read and written in full, and the read was short: the socket is
    /// drained and its readiness already cleared.
    MovedAll,
    /// `to` could not take these bytes yet.
    Left(Vec<u8>, bool),
    /// Nothing to read.
    Drained,
    Eof,
}

/// Move what `from` has ready, until it would block. Returns true once
/// `from` reached end-of-stream (which `drive` passes on). Also
/// the splice path's fallback when it cannot get a pipe.
pub(super) async fn move_ready(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress<'_>,
) -> io::Result<bool> {
    loop {
        match step(from, to, progress)? {
            Step::Moved => {}
            Step::MovedAll | Step::Drained => return Ok(false),
            Step::Eof => return Ok(true),
            Step::Left(rest, drained) => {
                write_all(to, &rest, progress).await?;
                if drained {
                    return Ok(false);
                }
            }
        }
    }
}

/// One read into the scratch buffer and one write of what was read, with
/// no await in between (the buffer is shared by the thread's tasks).
pub(super) fn step(from: &TcpStream, to: &TcpStream, progress: &Progress<'_>) -> io::Result<Step> {
    scratch::PUMP.with(|buf| {
        let short = Cell::new(None);
        // A read shorter than the buffer emptied the socket's queue: say
        // "would block" to tokio so it clears the readiness now, instead
        // of finding out with one more read that fails. Bytes arriving
        // after the read raise a new readiness event; a FIN that came
        // with them stays flagged (tokio never clears "read closed").
        let read = from.try_io(Interest::READABLE, || {
            let n = (&*SockRef::from(from)).read(buf)?;
            if n > 0 && n < buf.len() {
                short.set(Some(n));
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let (n, drained) = match (read, short.get()) {
            (_, Some(n)) => (n, true),
            (Ok(0), None) => return Ok(Step::Eof),
            (Ok(n), None) => (n, false),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Drained),
            (Err(e), None) => return Err(e),
        };
        let written = match to.try_write(&buf[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        progress.add(written);
        Ok(match (written == n, drained) {
            (true, false) => Step::Moved,
            (true, true) => Step::MovedAll,
            (false, _) => Step::Left(buf[written..n].to_vec(), drained),
        })
    })
}

pub(super) async fn write_all(
    to: &TcpStream,
    mut data: &[u8],
    progress: &Progress<'_>,
) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                progress.add(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
