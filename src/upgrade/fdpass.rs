//! Messages over the control socket: one line of JSON each, with file
//! descriptors attached where a message carries listening sockets
//! (SCM_RIGHTS, through rustix's safe `sendmsg`/`recvmsg`).
//!
//! A line and its descriptors go out in one `sendmsg`. The conversation
//! is strictly request and answer, so at most one message is in flight
//! and the descriptors received belong to the line being read.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Descriptors per message at most: the kernel takes up to 253
/// (SCM_MAX_FD); a listener group is one socket per worker.
pub const MAX_FDS: usize = 250;

/// The longest line accepted (a message is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// One end of a control connection (blocking).
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// How long a `recv` waits for the peer (`None`: for ever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    pub fn send(&mut self, msg: &impl Serialize) -> io::Result<()> {
        self.send_with_fds(msg, &[])
    }

    /// Send `msg` with `fds` attached (at most `MAX_FDS`).
    pub fn send_with_fds(
        &mut self,
        msg: &impl Serialize,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::other(format!(
                "{} descriptors in one message (at most {MAX_FDS})",
                fds.len()
            )));
        }
        let mut line = serde_json::to_vec(msg)?;
        line.push(b'\n');
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other(
                "descriptors do not fit the control buffer",
            ));
        }
        let sent = rustix::net::sendmsg(
            &self.stream,
            &[IoSlice::new(&line)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        // The descriptors went with the first byte; the rest of a long
        // line follows as plain bytes.
        (&self.stream).write_all(&line[sent..])
    }

    /// The next message and the descriptors that came with it.
    pub fn recv<T: DeserializeOwned>(&mut self) -> io::Result<(T, Vec<OwnedFd>)> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let msg = serde_json::from_slice(&line[..end]).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}"))
                })?;
                return Ok((msg, self.fds.drain(..).collect()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message too long",
                ));
            }
            let mut chunk = [0u8; 4096];
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = rustix::net::recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                // Not inherited by anything this process starts later.
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(|e| match io::Error::from(e) {
                e if e.kind() == io::ErrorKind::WouldBlock => {
                    io::Error::new(io::ErrorKind::TimedOut, "no answer in time")
                }
                e => e,
            })?;
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = m {
                    self.fds.extend(fds);
                }
            }
            if got.flags.contains(ReturnFlags::CTRUNC) {
                return Err(io::Error::other("descriptors were cut off in transit"));
            }
            if got.bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other process closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..got.bytes]);
        }
    }

    /// The connected process's id (SO_PEERCRED).
    pub fn peer_pid(&self) -> io::Result<u32> {
        let cred = rustix::net::sockopt::socket_peercred(&self.stream)?;
        Ok(cred.pid.as_raw_nonzero().get() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A listening socket sent over the connection is the same socket:
    /// a connection queued before the transfer is accepted from the copy.
    #[test]
    fn a_listening_socket_arrives_with_its_queue() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        a.send_with_fds(&serde_json::json!({"bind": addr}), &[listener.as_fd()])
            .unwrap();
        drop(listener);
        let (msg, fds): (serde_json::Value, _) = b.recv().unwrap();
        assert_eq!(msg["bind"], addr.to_string());
        assert_eq!(fds.len(), 1);
        let copy = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(copy.local_addr().unwrap(), addr);
        let (_conn, peer) = copy.accept().unwrap();
        assert_eq!(peer, _client.local_addr().unwrap());
        // Plain messages pass too, and a timeout is reported as one.
        a.send(&serde_json::json!({"n": 1})).unwrap();
        let (msg, fds): (serde_json::Value, _) = b.recv().unwrap();
        assert_eq!((msg["n"].as_i64(), fds.len()), (Some(1), 0));
        b.set_timeout(Some(Duration::from_millis(50))).unwrap();
        let err = b.recv::<serde_json::Value>().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(b.peer_pid().unwrap(), std::process::id());
    }
}
