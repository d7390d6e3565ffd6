//! One direction of the pump with splice(2): socket → pipe → socket; in
//! `auto` mode only for bulk transfers. Ends at end-of-stream; passing
//! the FIN on is `drive`'s.

use std::io;
use std::os::fd::AsFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{self, Step};
use super::pipes::{self, CHUNK};
use super::splice::Pipe;
use super::Progress;

pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    auto: bool,
    progress: &Progress<'_>,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        if auto {
            // One buffered read first: if it drains the socket this was a
            // small exchange and is done; only a read that fills the
            // buffer (a bulk transfer) goes on with splice.
            match copy::step(from, to, progress)? {
                Step::Moved => {}
                Step::MovedAll | Step::Drained => continue,
                Step::Eof => return Ok(()),
                Step::Left(rest, drained) => {
                    copy::write_all(to, &rest, progress).await?;
                    if drained {
                        continue;
                    }
                }
            }
        }
        let pipe = match pipes::take() {
            Ok(pipe) => pipe,
            // No descriptor (EMFILE/ENFILE) or pipe memory for a new pipe:
            // move this batch through a buffer rather than tear down a
            // healthy connection, and try for a pipe again next time.
            Err(_) => {
                if copy::move_ready(from, to, progress).await? {
                    return Ok(());
                }
                continue;
            }
        };
        // Move bytes while the socket has them; the pipe goes back to the
        // pool the moment the socket would block.
        loop {
            match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_fd(), CHUNK)) {
                Ok(0) => {
                    pipes::give(pipe);
                    return Ok(());
                }
                Ok(n) => drain(&pipe, to, n, progress).await?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipes::give(pipe);
                    break;
                }
                Err(e) => {
                    pipes::give(pipe);
                    return Err(e);
                }
            }
        }
    }
}

/// Empty the pipe into `to`. On error the pipe (which may still hold
/// bytes) is dropped by the caller, never returned to the pool.
async fn drain(
    pipe: &Pipe,
    to: &TcpStream,
    mut left: usize,
    progress: &Progress<'_>,
) -> io::Result<()> {
    while left > 0 {
        match to.try_io(Interest::WRITABLE, || pipe.drain_to(to.as_fd(), left)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                left -= n;
                progress.add(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
