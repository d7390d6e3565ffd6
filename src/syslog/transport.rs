//! The three ways to a syslog server, as blocking sockets used by the
//! sender's own thread (nothing here runs on the proxy's threads).
//!
//! - UDP (RFC 5426): one message per datagram. The socket is connected, so
//!   the ICMP "port unreachable" of a stopped server comes back as an error
//!   on a later send rather than going unnoticed.
//! - TCP (RFC 6587 §3.4.1): octet-counted framing, `LEN SP MESSAGE`, which
//!   unlike newline framing survives a newline inside a message.
//! - Unix datagram (`/dev/log`): one message per datagram, as for UDP.
//!   rsyslog's imuxsock parses RFC 5424 with its special parser off;
//!   journald does not parse it (see docs/operations.md). Writes do
//!   not wait: a full receive queue of a local daemon would otherwise
//!   block the sender, as it famously blocks `syslog(3)` callers.

use std::io::{self, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::settings::Transport;

/// How long a TCP connect or a blocked write may take before the server
/// counts as unreachable.
const TCP_TIMEOUT: Duration = Duration::from_secs(3);

pub enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Unix(UnixDatagram),
}

/// Why a message was not delivered.
#[derive(Debug)]
pub enum SendError {
    /// The receiver is there but has no room (a local datagram socket
    /// whose queue is full): the message is lost, the connection stays.
    Full,
    /// The server is gone or refused: reconnect after a pause.
    Broken(io::Error),
}

impl Conn {
    pub fn open(t: &Transport) -> io::Result<Conn> {
        match t {
            Transport::Udp(addr) => {
                let local = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(local)?;
                s.connect(addr)?;
                s.set_write_timeout(Some(TCP_TIMEOUT))?;
                Ok(Conn::Udp(s))
            }
            Transport::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, TCP_TIMEOUT)?;
                s.set_write_timeout(Some(TCP_TIMEOUT))?;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
            Transport::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                s.set_nonblocking(true)?;
                Ok(Conn::Unix(s))
            }
        }
    }

    /// A stream transport whose server has closed its end: found before
    /// writing, since the first write into a closed TCP connection still
    /// succeeds and its message would be lost without an error.
    pub fn closed_by_peer(&self) -> bool {
        let Conn::Tcp(s) = self else { return false };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
        match socket2::SockRef::from(s).recv_with_flags(&mut buf, flags) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// Send `messages` (each a formatted RFC 5424 message): one datagram
    /// each, or one framed write of them all on TCP. Returns how many were
    /// handed to the kernel, and the error that stopped the rest.
    pub fn send(&mut self, messages: &[Vec<u8>]) -> (usize, Result<(), SendError>) {
        match self {
            Conn::Udp(s) => {
                for (i, m) in messages.iter().enumerate() {
                    if let Err(e) = s.send(m) {
                        return (i, Err(SendError::Broken(e)));
                    }
                }
            }
            Conn::Unix(s) => {
                for (i, m) in messages.iter().enumerate() {
                    match s.send(m) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return (i, Err(SendError::Full))
                        }
                        Err(e) => return (i, Err(SendError::Broken(e))),
                    }
                }
            }
            Conn::Tcp(s) => {
                let mut framed = Vec::with_capacity(messages.iter().map(|m| m.len() + 6).sum());
                for m in messages {
                    octet_counted(m, &mut framed);
                }
                if let Err(e) = s.write_all(&framed) {
                    return (0, Err(SendError::Broken(e)));
                }
            }
        }
        (messages.len(), Ok(()))
    }
}

/// Append the octet-counted frame of one message (RFC 6587 §3.4.1).
pub fn octet_counted(message: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(message.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(message);
}
