//! One direction between two sockets, as a small state machine that
//! `drive` polls: read from one socket, write to the other, until
//! end-of-stream.
//!
//! It is polled rather than written as an `async fn` for the memory of an
//! idle connection, most of a device fleet. A waiting `Way` is about 64
//! bytes and holds no buffer, no pipe and no readiness future: it waits
//! with `poll_read_ready`, which parks the task's waker in the socket's
//! own slot. The async version kept the largest state of every nested
//! future (reads, writes, pipe drains) for the connection's whole life.
//!
//! How bytes move (`splice`):
//! - `Off`: each read goes into the thread's scratch buffer and is written
//!   on at once; only what the writer could not take is copied out and
//!   kept, until written.
//! - `Always` (Linux): socket → pooled pipe → socket with splice(2). The
//!   pipe is taken while bytes move and given back the moment the socket
//!   would block (a pipe holding bytes the writer could not take yet stays
//!   until they are written).
//! - `Auto`: each burst starts as `Off`; a read that fills the buffer
//!   marks a bulk transfer, whose rest moves as `Always` until the socket
//!   would block.

use std::io::{self, Read};
#[cfg(target_os = "linux")]
use std::os::fd::AsFd;
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use super::pipes::{self, CHUNK};
#[cfg(target_os = "linux")]
use super::splice::Pipe;
use super::{Progress, SpliceMode};
use crate::scratch;

pub(super) struct Way<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    progress: &'a Progress<'a>,
    mode: SpliceMode,
    /// `Auto`: this burst is a bulk transfer and moves spliced.
    bulk: bool,
    /// Bytes read that `to` has not taken yet. Boxed: rare, and a waiting
    /// connection then carries one pointer instead of a vector and an
    /// offset.
    held: Option<Box<Held>>,
    /// A pipe taken from the pool while bytes move, and how many bytes it
    /// holds on their way to `to`.
    #[cfg(target_os = "linux")]
    pipe: Option<Pipe>,
    #[cfg(target_os = "linux")]
    in_pipe: usize,
}

/// Bytes read that the writer has not taken yet, from `written` on.
struct Held {
    bytes: Vec<u8>,
    written: usize,
}

/// What one read step did.
enum Step {
    /// Bytes moved; the socket may have more.
    More,
    /// The socket has nothing more now; its readiness is cleared.
    Drained,
    /// End of stream.
    Eof,
}

impl<'a> Way<'a> {
    pub(super) fn new(
        from: &'a TcpStream,
        to: &'a TcpStream,
        mode: SpliceMode,
        progress: &'a Progress<'a>,
    ) -> Self {
        Way {
            from,
            to,
            progress,
            mode,
            bulk: false,
            held: None,
            #[cfg(target_os = "linux")]
            pipe: None,
            #[cfg(target_os = "linux")]
            in_pipe: 0,
        }
    }

    /// Move bytes until `from` ends (Ready(Ok)), an error, or nothing can
    /// move now (Pending, with the waker parked on the socket that will
    /// let it go on).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Finish what the writer could not take before reading more.
            ready!(self.poll_flush_held(cx))?;
            #[cfg(target_os = "linux")]
            ready!(self.poll_flush_pipe(cx))?;
            ready!(self.from.poll_read_ready(cx))?;
            match self.step()? {
                Step::More => {}
                Step::Drained => {
                    self.bulk = false;
                    self.release_pipe();
                }
                Step::Eof => {
                    self.release_pipe();
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    fn step(&mut self) -> io::Result<Step> {
        #[cfg(target_os = "linux")]
        if self.mode == SpliceMode::Always || self.bulk {
            return self.splice_step();
        }
        self.copy_step()
    }

    /// One read into the thread's scratch buffer and one write of what was
    /// read, with nothing awaited in between (the buffer is shared by the
    /// thread's connections).
    fn copy_step(&mut self) -> io::Result<Step> {
        let (from, to) = (self.from, self.to);
        scratch::PUMP.with(|buf| {
            let mut short = None;
            // A read shorter than the buffer emptied the socket's queue:
            // say "would block" to tokio so it clears the readiness now,
            // instead of finding out with one more read that fails. Bytes
            // arriving after the read raise a new readiness event; a FIN
            // that came with them stays flagged (tokio never clears "read
            // closed").
            let read = from.try_io(Interest::READABLE, || {
                let n = (&*SockRef::from(from)).read(buf)?;
                if n > 0 && n < buf.len() {
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            let n = match (read, short) {
                (_, Some(n)) => n,
                (Ok(0), None) => return Ok(Step::Eof),
                (Ok(n), None) => n,
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Step::Drained)
                }
                (Err(e), None) => return Err(e),
            };
            let sent = match to.try_write(&buf[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            self.progress.add(sent);
            if sent < n {
                self.held = Some(Box::new(Held {
                    bytes: buf[sent..n].to_vec(),
                    written: 0,
                }));
            }
            if short.is_some() {
                return Ok(Step::Drained);
            }
            // A full buffer: in `Auto`, the rest of this burst is bulk.
            self.bulk = self.mode == SpliceMode::Auto;
            Ok(Step::More)
        })
    }

    /// Write what `to` could not take yet; the buffer is freed once it has.
    fn poll_flush_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(held) = self.held.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while held.written < held.bytes.len() {
            ready!(self.to.poll_write_ready(cx))?;
            match self.to.try_write(&held.bytes[held.written..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    held.written += n;
                    self.progress.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.held = None;
        Poll::Ready(Ok(()))
    }

    /// One splice from the socket into a pipe, and on into `to` as far as
    /// it takes it now.
    #[cfg(target_os = "linux")]
    fn splice_step(&mut self) -> io::Result<Step> {
        let pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => match pipes::take() {
                Ok(pipe) => pipe,
                // No descriptor (EMFILE/ENFILE) or pipe memory for a new
                // pipe: move this batch through the buffer rather than
                // tear down a healthy connection; try again next burst.
                Err(_) => return self.copy_step(),
            },
        };
        let from = self.from;
        let step = match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_fd(), CHUNK)) {
            Ok(0) => Step::Eof,
            Ok(n) => {
                self.in_pipe = n;
                Step::More
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Drained,
            Err(e) => {
                pipes::give(pipe);
                return Err(e);
            }
        };
        self.pipe = Some(pipe);
        if self.in_pipe > 0 {
            self.drain_pipe()?;
        }
        Ok(step)
    }

    /// Empty the pipe into `to` as far as it takes bytes without waiting.
    #[cfg(target_os = "linux")]
    fn drain_pipe(&mut self) -> io::Result<()> {
        let (Some(pipe), to) = (&self.pipe, self.to) else {
            return Ok(());
        };
        while self.in_pipe > 0 {
            match to.try_io(Interest::WRITABLE, || {
                pipe.drain_to(to.as_fd(), self.in_pipe)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.in_pipe -= n;
                    self.progress.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The pipe may still hold bytes: `Drop` closes it instead
                // of giving it back.
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[cfg(target_os = "linux")]
    fn poll_flush_pipe(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.in_pipe > 0 {
            ready!(self.to.poll_write_ready(cx))?;
            self.drain_pipe()?;
        }
        Poll::Ready(Ok(()))
    }

    /// Give an empty pipe back to the pool: an idle connection holds none.
    fn release_pipe(&mut self) {
        #[cfg(target_os = "linux")]
        if self.in_pipe == 0 {
            if let Some(pipe) = self.pipe.take() {
                pipes::give(pipe);
            }
        }
    }
}

impl Drop for Way<'_> {
    /// An empty pipe goes back to the pool; one with bytes in it is closed,
    /// or another connection would receive them.
    fn drop(&mut self) {
        self.release_pipe();
    }
}
