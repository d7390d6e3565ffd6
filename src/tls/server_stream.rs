//! A terminated TLS connection as an `AsyncRead + AsyncWrite` stream that
//! holds no buffer while it waits.
//!
//! `tokio_rustls` wraps rustls' buffered connection, which keeps a 4 KiB
//! receive buffer (and its queues) for the whole life of a connection. An
//! offload listener mostly holds idle devices: keep-alive connections
//! between polls and command WebSockets that are silent for hours. This
//! stream drives rustls' *unbuffered* API instead: socket bytes are read
//! into a per-thread scratch buffer and decrypted from there, records are
//! encrypted into another per-thread buffer and written at once. A
//! connection owns a buffer only for what is actually pending (a partial
//! record, plaintext its reader had no room for, ciphertext the socket
//! would not take) and frees it once that is gone.
//!
//! rustls' connection state itself is the larger part of what an idle
//! connection holds (its handshake deframer, the client's certificates,
//! record queues, the key schedule's state machine): the first time an
//! established TLS 1.3 connection waits for the client with nothing
//! pending, it hands its records over to [`RecordLayer`] (records.rs),
//! which keeps only the keys. TLS 1.2 connections keep rustls.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{CommonState, ServerConfig};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::scratch::{self, TLS_GATHER, TLS_READ, TLS_WRITE};
use crate::tls::client_hello::{self, HelloError, Parsed, HANDSHAKE_HEADER_LEN, RECORD_HEADER_LEN};
use crate::tls::records::{self, ClientRandom, Opened, RecordLayer, Secrets};
use crate::tls::refusal::{Reason, Refused};

/// Socket reads and plaintext writes go through buffers of this size: one
/// full TLS record, so bulk transfers still move whole records.
const CHUNK: usize = scratch::CHUNK;
/// Worst-case growth of one record when encrypted (header, TLS 1.2
/// explicit nonce, tag, TLS 1.3 content type), rounded up.
const RECORD_OVERHEAD: usize = 64;
/// Most bytes a connection holds while later handshake flights arrive.
/// rustls refuses any handshake message over 64 KiB (a client certificate
/// chain is the largest one); such a message in full-size records (RFC 8446
/// allows 256 bytes of expansion per record) plus one more read of the next
/// flight stays below this. Only a peer cutting messages into tiny records
/// goes past it.
const HANDSHAKE_BUFFER_MAX: usize = 0x1_0000 + 5 * (RECORD_HEADER_LEN + 256) + CHUNK;
/// A fatal `decode_error` alert in a plaintext record: the answer to a
/// ClientHello that is refused before rustls sees it.
const ALERT_DECODE_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];

/// A server-side TLS stream over a TCP socket; see the module docs.
pub struct ServerStream {
    tcp: TcpStream,
    session: Session,
    /// Received bytes rustls has not consumed yet: the start of a record.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader had no room for, from `plain_pos` on.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes the socket did not take yet, from `out_pos` on.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The client sent close_notify or closed its side of the socket.
    read_closed: bool,
    /// Our close_notify is queued: nothing more may be written.
    close_sent: bool,
    sni: Option<String>,
}

/// Who protects the connection's records.
enum Session {
    /// rustls: the handshake, and the traffic until the connection first
    /// waits idle (for good on TLS 1.2). `secrets` are the application
    /// traffic secrets the key log captured (TLS 1.3).
    Rustls {
        conn: Box<UnbufferedServerConnection>,
        secrets: Option<Box<Secrets>>,
    },
    /// The bare TLS 1.3 record layer, from the first idle wait on.
    Records(Box<RecordLayer>),
    /// rustls' state was given up and the record layer refused what it
    /// handed over (never seen but with a client reusing another's
    /// ClientHello random): the connection cannot go on.
    Failed,
}

fn handover_failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the TLS session could not be handed to the record layer",
    )
}

/// What rustls is asked to do besides consuming the input it is given.
enum Want<'a, 'b> {
    /// Only read: decrypted data goes to the reader's buffer, then to
    /// `plain`.
    Read(Option<&'a mut ReadBuf<'b>>),
    /// Encrypt these bytes into the outgoing buffer.
    Write(&'a [u8]),
    /// Encrypt a close_notify alert into the outgoing buffer.
    Close,
}

/// Where a run of rustls stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// All complete records are processed; more input is needed.
    NeedInput,
    /// The `Write` or `Close` request is done.
    Done,
    /// Both sides sent close_notify.
    Closed,
}

impl ServerStream {
    /// Run the server handshake on `tcp`. A failed handshake is
    /// [`Refused`]: its reason, the server name the client asked for, and
    /// the error: an `InvalidData` one that wraps the `rustls::Error`, as
    /// `tokio_rustls` does, after sending rustls' alert if it has one.
    ///
    /// The ClientHello is gathered and measured before rustls sees it: one
    /// that declares or takes more than `hello_max_bytes` (record headers
    /// included) is refused with a `decode_error` alert and an
    /// `InvalidData` error wrapping [`HelloError::TooLarge`].
    pub async fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        hello_max_bytes: usize,
    ) -> Result<ServerStream, Refused> {
        let conn = match UnbufferedServerConnection::new(config) {
            Ok(conn) => conn,
            Err(e) => {
                return Err(Refused {
                    reason: Reason::Other,
                    sni: None,
                    error: tls_error(e),
                    silent: false,
                })
            }
        };
        let mut s = ServerStream {
            tcp,
            session: Session::Rustls {
                conn: Box::new(conn),
                secrets: None,
            },
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            read_closed: false,
            close_sent: false,
            sni: None,
        };
        let mut progress = Progress::default();
        match s.handshake(hello_max_bytes, &mut progress).await {
            Ok(()) => {
                if let (Some(random), Session::Rustls { secrets, .. }) =
                    (progress.random.0.take(), &mut s.session)
                {
                    *secrets = records::take_secrets(&random).map(Box::new);
                }
                Ok(s)
            }
            Err(error) => {
                // Bytes the hello parser found not to be a ClientHello
                // went to rustls for its alert: the parser's verdict is
                // the more precise one.
                let reason = match &progress.unparsed {
                    Some(hello) if !progress.after_hello => Reason::of_hello(hello),
                    _ => Reason::of_io(&error, progress.after_hello),
                };
                Err(Refused {
                    reason,
                    sni: s.sni.take(),
                    error,
                    silent: progress.silent,
                })
            }
        }
    }

    async fn handshake(
        &mut self,
        hello_max_bytes: usize,
        progress: &mut Progress,
    ) -> io::Result<()> {
        let s = self;
        s.sni = s.receive_hello(hello_max_bytes, progress).await?;
        loop {
            let mut input = std::mem::take(&mut s.incoming);
            let ran = s.run(&mut input, Want::Read(None));
            let used = match ran {
                Ok((used, _)) => used,
                Err(failed) => {
                    progress.after_hello |= s.out_pos < s.outgoing.len();
                    s.send_alert(&mut input[failed.used..]);
                    return Err(failed.error);
                }
            };
            input.drain(..used);
            s.incoming = input;
            // The server's first flight answers the ClientHello (a later
            // message may fail in the same run, above).
            progress.after_hello |= s.out_pos < s.outgoing.len();
            poll_fn(|cx| s.poll_flush_out(cx)).await?;
            if !s.rustls().is_handshaking() {
                break;
            }
            if s.read_closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // Handshake flights are small and short-lived: they wait in
            // the connection's own buffer (a client certificate chain may
            // span several reads), which holds no more than has arrived.
            let Some(room) = HANDSHAKE_BUFFER_MAX.checked_sub(s.incoming.len()) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("handshake messages take more than {HANDSHAKE_BUFFER_MAX} bytes"),
                ));
            };
            if s.read_handshake(room).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if s.incoming.is_empty() {
            s.incoming = Vec::new();
        } else {
            s.incoming.shrink_to_fit();
        }
        Ok(())
    }

    /// Read until `incoming` holds a whole ClientHello (or bytes that are
    /// not one, which rustls then refuses with its own alert). rustls
    /// checks the handshake length only once the message is complete, and
    /// keeps a partial one in the caller's buffer: without this a client
    /// could make a connection hold up to 64 KiB per handshake message for
    /// the whole handshake timeout.
    ///
    /// Returns the hello's server name: the one rustls chooses the
    /// certificate by (rustls' unbuffered connection does not tell it).
    async fn receive_hello(
        &mut self,
        max: usize,
        progress: &mut Progress,
    ) -> io::Result<Option<String>> {
        let max = max.max(RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN);
        loop {
            match hello_state(&self.incoming, max) {
                Ok(Hello::Complete { sni, random }) => {
                    progress.random.0 = Some(random);
                    return Ok(sni);
                }
                Ok(Hello::Unparsed(e)) => {
                    progress.unparsed = Some(e);
                    return Ok(None);
                }
                Ok(Hello::Incomplete) => {}
                Err(e) => {
                    // Best effort: the connection is dropped either way.
                    let _ = self.tcp.try_write(&ALERT_DECODE_ERROR);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
            progress.silent = self.incoming.is_empty();
            if self.read_handshake(max - self.incoming.len()).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            progress.silent = false;
        }
    }

    /// Append at most `room` bytes from the socket to `incoming`; 0 is the
    /// end of the client's stream. The bytes pass through the thread's
    /// scratch buffer, so the connection's grows only by what came.
    async fn read_handshake(&mut self, room: usize) -> io::Result<usize> {
        let room = room.clamp(1, CHUNK);
        poll_fn(|cx| {
            TLS_READ.with(|scratch| {
                let n = ready!(poll_read_socket(&self.tcp, cx, &mut scratch[..room]))?;
                self.incoming.extend_from_slice(&scratch[..n]);
                Poll::Ready(Ok(n))
            })
        })
        .await
    }

    /// The negotiated session: version, ALPN, the client's certificates.
    /// Read it before the stream: an idle TLS 1.3 connection gives rustls'
    /// state up (and this panics after that).
    pub fn session(&self) -> &CommonState {
        match &self.session {
            Session::Rustls { conn, .. } => conn,
            _ => panic!("the TLS session is read after the records were handed over"),
        }
    }

    /// rustls' connection, during the handshake.
    fn rustls(&mut self) -> &mut UnbufferedServerConnection {
        match &mut self.session {
            Session::Rustls { conn, .. } => conn,
            _ => unreachable!("the records are handed over after the handshake"),
        }
    }

    /// The first time an established TLS 1.3 connection waits for the
    /// client with nothing pending either way, it gives rustls' state up
    /// for the bare record layer (records.rs).
    fn hand_over_when_idle(&mut self) {
        let Session::Rustls { conn, secrets } = &self.session else {
            return;
        };
        let pending = !self.incoming.is_empty()
            || self.plain_pos < self.plain.len()
            || self.out_pos < self.outgoing.len();
        if secrets.is_none() || pending || self.read_closed || self.close_sent {
            return;
        }
        if conn.is_handshaking()
            || conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
        {
            return;
        }
        let Some(suite) = conn.negotiated_cipher_suite().map(|s| s.suite()) else {
            return;
        };
        if !RecordLayer::supports(suite) {
            return;
        }
        let Session::Rustls { conn, secrets } =
            std::mem::replace(&mut self.session, Session::Failed)
        else {
            unreachable!("matched above")
        };
        let Some(secrets) = secrets else {
            unreachable!("checked above")
        };
        if let Ok((handed, _)) = conn.dangerous_into_kernel_connection() {
            if let Some(layer) = RecordLayer::new(suite, *secrets, handed) {
                self.session = Session::Records(Box::new(layer));
            }
        }
    }

    /// The server name the client asked for (SNI), lowercased.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// The server name, moved out (for a record kept elsewhere).
    pub fn take_server_name(&mut self) -> Option<String> {
        self.sni.take()
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether a read would return at once without waiting for the socket:
    /// decrypted bytes are waiting, or the client has closed.
    pub fn has_buffered_input(&self) -> bool {
        self.plain_pos < self.plain.len() || self.read_closed
    }

    /// Feed `input` to rustls until it needs more, doing `want` on the way.
    /// Returns how many bytes of `input` rustls consumed; the caller must
    /// drop them from the front before the next run. Handshake and alert
    /// records rustls produces are appended to `outgoing`; so is the
    /// `Write`/`Close` output unless the caller took `outgoing` to hold it
    /// in a scratch buffer.
    fn run(&mut self, input: &mut [u8], want: Want<'_, '_>) -> Result<(usize, Stop), Failed> {
        self.run_into(input, want, None)
    }

    fn run_into(
        &mut self,
        input: &mut [u8],
        mut want: Want<'_, '_>,
        out: Option<&mut Vec<u8>>,
    ) -> Result<(usize, Stop), Failed> {
        let out = match out {
            Some(o) => o,
            None => &mut self.outgoing,
        };
        let Session::Rustls { conn, .. } = &mut self.session else {
            return Err(Failed {
                used: 0,
                error: handover_failed(),
            });
        };
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut input[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    return Err(Failed {
                        used: used + discard,
                        error: tls_error(e),
                    })
                }
            };
            let fail = |error| Failed { used, error };
            let mut stop = None;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(|e| fail(tls_error(e)))?;
                        let dest = match &mut want {
                            Want::Read(d) => d.as_deref_mut(),
                            _ => None,
                        };
                        deliver(rec.payload, dest, &mut self.plain, &mut self.plain_pos);
                    }
                }
                ConnectionState::ReadEarlyData(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(|e| fail(tls_error(e)))?;
                        deliver(rec.payload, None, &mut self.plain, &mut self.plain_pos);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let start = out.len();
                    let mut room = 4096;
                    loop {
                        out.resize(start + room, 0);
                        match e.encode(&mut out[start..]) {
                            Ok(n) => {
                                out.truncate(start + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                            Err(EncodeError::AlreadyEncoded) => {
                                out.truncate(start);
                                break;
                            }
                        }
                    }
                }
                // Everything encoded is in `out`, which is written before
                // anything else goes to the socket.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => stop = Some(Stop::NeedInput),
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    self.read_closed = true;
                    stop = Some(Stop::Closed);
                }
                ConnectionState::WriteTraffic(mut w) => match want {
                    Want::Read(_) => stop = Some(Stop::NeedInput),
                    Want::Write(data) => {
                        encrypt_into(out, data.len(), |buf| w.encrypt(data, buf)).map_err(fail)?;
                        stop = Some(Stop::Done);
                    }
                    Want::Close => {
                        encrypt_into(out, 0, |buf| w.queue_close_notify(buf)).map_err(fail)?;
                        stop = Some(Stop::Done);
                    }
                },
                _ => {
                    return Err(fail(io::Error::other(
                        "unexpected state of the TLS connection",
                    )))
                }
            }
            used += discard;
            if let Some(stop) = stop {
                return Ok((used, stop));
            }
        }
    }

    /// After a fatal error rustls queues an alert for the peer: send it if
    /// the socket takes it now (the connection is dropped either way).
    /// `input` must be the failed run's input from where it stopped: rustls
    /// may still hold positions in it (a partial handshake message), and
    /// an empty buffer in its place makes it index out of bounds.
    fn send_alert(&mut self, input: &mut [u8]) {
        let UnbufferedStatus { state, .. } = self.rustls().process_tls_records(input);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            let mut buf = [0u8; 64];
            if let Ok(n) = e.encode(&mut buf) {
                self.outgoing.extend_from_slice(&buf[..n]);
            }
        }
        let _ = self.tcp.try_write(&self.outgoing[self.out_pos..]);
    }

    /// Write the pending ciphertext; frees the buffer once it is out.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.out_pos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Read the socket and run rustls over what came (after any partial
    /// record kept from before). Returns the bytes read; 0 is the end of
    /// the client's stream.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        dest: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.incoming.is_empty() {
            // The common case: whole records arrive. Decrypt them from the
            // thread's scratch buffer; only a trailing partial record is
            // copied into the connection.
            TLS_READ.with(|scratch| {
                let n = ready!(poll_read_socket(&self.tcp, cx, scratch))?;
                let used = self.run_read(&mut scratch[..n], dest)?;
                if used < n {
                    self.incoming.extend_from_slice(&scratch[used..n]);
                }
                Poll::Ready(Ok(n))
            })
        } else {
            let mut input = std::mem::take(&mut self.incoming);
            let start = input.len();
            input.resize(start + CHUNK, 0);
            let read = poll_read_socket(&self.tcp, cx, &mut input[start..]);
            let n = match read {
                Poll::Ready(Ok(n)) => n,
                other => {
                    input.truncate(start);
                    self.incoming = input;
                    return other;
                }
            };
            input.truncate(start + n);
            let used = self.run_read(&mut input, dest);
            self.incoming = input;
            let used = used?;
            self.incoming.drain(..used);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            Poll::Ready(Ok(n))
        }
    }

    fn run_read(&mut self, input: &mut [u8], dest: &mut ReadBuf<'_>) -> io::Result<usize> {
        let Session::Records(layer) = &mut self.session else {
            let (used, _) = self.run(input, Want::Read(Some(dest)))?;
            return Ok(used);
        };
        let (plain, plain_pos) = (&mut self.plain, &mut self.plain_pos);
        let mut dest = Some(dest);
        let (used, opened) = layer.open(input, |payload| {
            deliver(payload, dest.as_deref_mut(), plain, plain_pos)
        })?;
        if opened == Opened::Closed {
            self.read_closed = true;
        }
        Ok(used)
    }

    /// Encrypt `data` into `out` as records.
    fn encrypt(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        match &mut self.session {
            Session::Records(layer) => return layer.seal(data, out),
            Session::Failed => return Err(handover_failed()),
            Session::Rustls { .. } => {}
        }
        let mut input = std::mem::take(&mut self.incoming);
        let ran = self.run_into(&mut input, Want::Write(data), Some(out));
        self.incoming = input;
        let (used, stop) = ran?;
        self.incoming.drain(..used);
        if stop != Stop::Done {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }

    /// Encrypt `data` and send what the socket takes now; the rest waits in
    /// `outgoing` (whose earlier content must have been written already).
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        TLS_WRITE.with(|out| {
            out.clear();
            self.encrypt(data, out)?;
            let sent = match self.tcp.try_write(out) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            if sent < out.len() {
                self.outgoing.extend_from_slice(&out[sent..]);
            }
            // A burst of large writes must not pin a large buffer per thread.
            if out.capacity() > 4 * (CHUNK + RECORD_OVERHEAD) {
                *out = Vec::new();
            }
            Ok(())
        })
    }
}

/// Copy a decrypted record to the reader, keeping what does not fit.
fn deliver(
    mut payload: &[u8],
    dest: Option<&mut ReadBuf<'_>>,
    plain: &mut Vec<u8>,
    plain_pos: &mut usize,
) {
    if let Some(dest) = dest {
        if plain.len() == *plain_pos {
            let n = payload.len().min(dest.remaining());
            dest.put_slice(&payload[..n]);
            payload = &payload[n..];
        }
    }
    if !payload.is_empty() {
        if *plain_pos == plain.len() {
            plain.clear();
            *plain_pos = 0;
        }
        plain.extend_from_slice(payload);
    }
}

/// Let rustls encrypt into the end of `out`, growing it as it asks.
fn encrypt_into(
    out: &mut Vec<u8>,
    len: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = len + (len / CHUNK + 1) * RECORD_OVERHEAD;
    loop {
        out.resize(start + room, 0);
        match encrypt(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) if s.required_size > room => {
                room = s.required_size
            }
            Err(e) => {
                out.truncate(start);
                return Err(io::Error::other(e));
            }
        }
    }
}

/// One read of the socket. A read that does not fill `buf` emptied the
/// socket's queue, so tokio is told to forget the readiness now rather
/// than after one more read that fails (see `l4/way.rs`).
fn poll_read_socket(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        let mut short = None;
        let read = tcp.try_io(Interest::READABLE, || {
            let n = io::Read::read(&mut &*SockRef::from(tcp), buf)?;
            if n > 0 && n < buf.len() {
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (read, short) {
            (_, Some(n)) => return Poll::Ready(Ok(n)),
            (Ok(n), None) => return Poll::Ready(Ok(n)),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Poll::Ready(Err(e)),
        }
    }
}

/// A run of rustls that failed, and how much of its input it had used.
struct Failed {
    used: usize,
    error: io::Error,
}

impl From<Failed> for io::Error {
    fn from(f: Failed) -> io::Error {
        f.error
    }
}

/// Where the ClientHello at the start of a connection stands.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// More bytes must arrive.
    Incomplete,
    /// It can go to rustls. `sni` is its server name, lowercased, as
    /// rustls reads it: an IP address is no name, a name that is not a
    /// DNS name is refused by rustls itself.
    Complete {
        sni: Option<String>,
        random: ClientRandom,
    },
    /// Bytes that are not a well-formed ClientHello: they also go to
    /// rustls, which refuses them with the right alert, and have no name
    /// (the one such hello rustls accepts is a name with a trailing dot,
    /// which RFC 6066 forbids). The parser's verdict names the refusal.
    Unparsed(HelloError),
}

/// How far a handshake got, for the reason of its failure.
#[derive(Debug, Default)]
struct Progress {
    /// The hello parser's verdict on bytes that are no ClientHello.
    unparsed: Option<HelloError>,
    /// rustls answered the ClientHello.
    after_hello: bool,
    /// The client closed (or reset) before sending a byte.
    silent: bool,
    /// The ClientHello's random, whose logged secrets are dropped if the
    /// handshake does not complete (or its future is dropped, at the
    /// handshake timeout).
    random: ForgetSecrets,
}

#[derive(Debug, Default)]
struct ForgetSecrets(Option<ClientRandom>);

impl Drop for ForgetSecrets {
    fn drop(&mut self) {
        if let Some(random) = &self.0 {
            records::forget_secrets(random);
        }
    }
}

/// Whether the ClientHello at the start of `incoming` is complete. A hello
/// that declares more than `max` bytes, or has taken `max` bytes of
/// records without ending, is too large.
fn hello_state(incoming: &[u8], max: usize) -> Result<Hello, HelloError> {
    match client_hello::parse_with_limit(incoming, max) {
        Ok(Parsed::Hello(info)) => Ok(Hello::Complete {
            sni: info.sni,
            random: info.random,
        }),
        Ok(Parsed::NeedMore) if incoming.len() >= max => Err(HelloError::TooLarge { limit: max }),
        Ok(Parsed::NeedMore) => Ok(Hello::Incomplete),
        Err(e @ HelloError::TooLarge { .. }) => Err(e),
        Err(e) => Ok(Hello::Unparsed(e)),
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = (this.plain.len() - this.plain_pos).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Alerts and key updates rustls answered while reading; the
            // socket is usually writable, and if not the wait is on the
            // read (a next write flushes them first).
            if this.out_pos < this.outgoing.len() {
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let before = buf.filled().len();
            let n = match this.poll_receive(cx, buf) {
                Poll::Ready(n) => n?,
                Poll::Pending => {
                    this.hand_over_when_idle();
                    return Poll::Pending;
                }
            };
            if n == 0 {
                // The client closed its side without close_notify, as
                // many do; to the reader this is the end of the stream.
                this.read_closed = true;
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // At most one write's worth of ciphertext waits for the socket.
        ready!(this.poll_flush_out(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(CHUNK);
        this.send(&buf[..n])?;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let first = nonempty.next();
        let (Some(first), None) = (first, nonempty.next()) else {
            // Several slices (hyper's head and body): one record for all.
            let this = self.get_mut();
            ready!(this.poll_flush_out(cx))?;
            if this.close_sent {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            return TLS_GATHER.with(|gather| {
                gather.clear();
                for b in bufs {
                    let room = CHUNK - gather.len();
                    if room == 0 {
                        break;
                    }
                    gather.extend_from_slice(&b[..b.len().min(room)]);
                }
                if gather.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                this.send(gather)?;
                Poll::Ready(Ok(gather.len()))
            });
        };
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_flush_out(cx))?;
            if let Session::Records(layer) = &mut this.session {
                // Best effort, as with rustls below: the FIN follows.
                let _ = layer.close_notify(&mut this.outgoing);
            } else {
                let mut input = std::mem::take(&mut this.incoming);
                let ran = this.run(&mut input, Want::Close);
                this.incoming = input;
                if let Ok((used, _)) = ran {
                    this.incoming.drain(..used);
                }
            }
            this.close_sent = true;
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::pki_types::ServerName;
    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::tls::server::{build_server_config, ServerTlsOptions};
    use crate::tls::testutil::{client_config, Pki};
    use crate::tls::MinVersion;

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    const HELLO_MAX: usize = client_hello::DEFAULT_MAX_HANDSHAKE;

    struct Setup {
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    }

    fn setup(
        min: MinVersion,
        client_versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Setup {
        setup_with_suites(min, client_versions, None)
    }

    /// `setup`, the client offering only `suites` when given.
    fn setup_with_suites(
        min: MinVersion,
        client_versions: &[&'static rustls::SupportedProtocolVersion],
        suites: Option<Vec<rustls::SupportedCipherSuite>>,
    ) -> Setup {
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(suites) = suites {
            provider.cipher_suites = suites;
        }
        let pki = Pki::new("stream CA");
        let mut opts = ServerTlsOptions::new(pki.server("api.test").certified());
        opts.min_version = min;
        opts.alpn = vec!["http/1.1".into()];
        let server = build_server_config(&opts).unwrap();
        let base = client_config(pki.roots(), None, &["http/1.1"]);
        let mut client = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(client_versions)
            .unwrap()
            .with_root_certificates(pki.roots())
            .with_no_client_auth();
        client.alpn_protocols = base.alpn_protocols.clone();
        Setup {
            server,
            client: Arc::new(client),
        }
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Client> {
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("api.test").unwrap(), tcp)
            .await
    }

    /// Echoes through a small read buffer, so that records are larger
    /// than what the reader takes and plaintext has to be kept.
    async fn echo(mut s: ServerStream) -> io::Result<ServerStream> {
        let mut buf = [0u8; 1000];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(s);
            }
            s.write_all(&buf[..n]).await?;
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn handed_over(s: &ServerStream) -> bool {
        matches!(s.session, Session::Records(_))
    }

    /// Echo 3 MiB; returns whether the server's side handed its records
    /// over to the bare record layer on the way.
    async fn echo_round_trip(setup: Setup, via: Option<SocketAddr>) -> bool {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let s = ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .unwrap();
            assert_eq!(s.server_name(), Some("api.test"));
            echo(s).await.unwrap()
        });
        let c = connect(via.unwrap_or(addr), setup.client).await.unwrap();
        let data = pattern(3 * 1024 * 1024 + 17);
        let (mut rd, mut wr) = tokio::io::split(c);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(7919) {
                wr.write_all(chunk).await.unwrap();
            }
            wr.flush().await.unwrap();
            wr
        });
        let mut got = vec![0u8; data.len()];
        rd.read_exact(&mut got).await.unwrap();
        assert!(got == data, "echoed bytes differ");
        let mut wr = writer.await.unwrap();
        // close_notify from the client ends the server's reads cleanly.
        wr.shutdown().await.unwrap();
        let s = server.await.unwrap();
        // Nothing pending: the connection holds no buffers.
        assert_eq!(s.incoming.capacity(), 0);
        assert_eq!(s.plain.capacity(), 0);
        assert_eq!(s.outgoing.capacity(), 0);
        handed_over(&s)
    }

    /// The name comes from the ClientHello as fleetgate parsed it before
    /// rustls saw it: lowercased, and none when the client sends none, on
    /// full and resumed handshakes alike.
    #[tokio::test]
    async fn the_server_name_is_the_hellos() {
        use rustls::HandshakeKind;
        let Setup { server, client } = setup(MinVersion::Tls12, &[&rustls::version::TLS13]);
        let mut no_sni = ClientConfig::clone(&client);
        no_sni.enable_sni = false;
        let no_sni = Arc::new(no_sni);
        let (l, addr) = listen().await;
        for (config, name, want, kind) in [
            (
                client.clone(),
                "API.Test",
                Some("api.test"),
                HandshakeKind::Full,
            ),
            (
                client.clone(),
                "api.test",
                Some("api.test"),
                HandshakeKind::Resumed,
            ),
            (no_sni.clone(), "api.test", None, HandshakeKind::Full),
            (no_sni, "api.test", None, HandshakeKind::Resumed),
        ] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from(name).unwrap();
            let client = tokio::spawn(tokio_rustls::TlsConnector::from(config).connect(name, tcp));
            let (tcp, _) = l.accept().await.unwrap();
            let mut s = ServerStream::accept(tcp, server.clone(), HELLO_MAX)
                .await
                .unwrap();
            assert_eq!(s.server_name(), want);
            assert_eq!(s.session().handshake_kind(), Some(kind), "{want:?}");
            let mut c = client.await.unwrap().unwrap();
            // Reading lets the client take in its session ticket, so the
            // next connection with this config resumes.
            s.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            c.read_exact(&mut one).await.unwrap();
            assert_eq!(s.take_server_name().as_deref(), want);
        }
    }

    #[tokio::test]
    async fn echoes_bulk_data_over_tls13() {
        let setup = setup(MinVersion::Tls12, &[&rustls::version::TLS13]);
        assert!(echo_round_trip(setup, None).await, "handed over");
    }

    /// Every TLS 1.3 suite the ring provider has, on the bare record layer.
    #[tokio::test]
    async fn echoes_over_each_tls13_suite_after_the_hand_over() {
        for suite in [
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let setup = setup_with_suites(
                MinVersion::Tls12,
                &[&rustls::version::TLS13],
                Some(vec![suite]),
            );
            assert!(echo_round_trip(setup, None).await, "{suite:?} handed over");
        }
    }

    #[tokio::test]
    async fn echoes_bulk_data_over_tls12() {
        let setup = setup(MinVersion::Tls12, &[&rustls::version::TLS12]);
        assert!(!echo_round_trip(setup, None).await, "TLS 1.2 keeps rustls");
    }

    /// A relay that passes the client's bytes on a few at a time: every
    /// record, the handshake's included, arrives in pieces.
    async fn trickle_relay(to: SocketAddr) -> SocketAddr {
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            let (client, _) = l.accept().await.unwrap();
            let server = TcpStream::connect(to).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
            let mut buf = [0u8; 4096];
            let mut step = 1;
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for piece in buf[..n].chunks(step) {
                    if sw.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                step = step % 97 + 13;
            }
            let _ = sw.shutdown().await;
        });
        addr
    }

    #[tokio::test]
    async fn records_arriving_in_pieces() {
        let setup = setup(MinVersion::Tls12, &[&rustls::version::TLS13]);
        let (l, addr) = listen().await;
        let relay = trickle_relay(addr).await;
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let s = ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .unwrap();
            echo(s).await.unwrap();
        });
        let mut c = connect(relay, setup.client).await.unwrap();
        let data = pattern(200_000);
        c.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        c.read_exact(&mut got).await.unwrap();
        assert!(got == data);
        c.shutdown().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn key_updates_from_the_client_are_followed() {
        let setup = setup(MinVersion::Tls13, &[&rustls::version::TLS13]);
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let s = ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .unwrap();
            let s = echo(s).await.unwrap();
            assert!(handed_over(&s), "the updates reached the record layer");
        });
        let mut c = connect(addr, setup.client).await.unwrap();
        for round in 0..5u8 {
            c.get_mut().1.refresh_traffic_keys().unwrap();
            let msg = [round; 3000];
            c.write_all(&msg).await.unwrap();
            let mut got = [0u8; 3000];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
        }
        c.shutdown().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn server_shutdown_sends_close_notify() {
        let setup = setup(MinVersion::Tls12, &[&rustls::version::TLS13]);
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut s = ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .unwrap();
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            // Held open: the client must see close_notify, not a FIN.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let mut c = connect(addr, setup.client).await.unwrap();
        let mut got = Vec::new();
        // read_to_end fails with UnexpectedEof unless close_notify came.
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }

    /// An idle connection hands its records over; afterwards it still
    /// writes, and its shutdown sends close_notify from the record layer.
    #[tokio::test]
    async fn after_the_hand_over_shutdown_sends_close_notify() {
        let setup = setup(MinVersion::Tls12, &[&rustls::version::TLS13]);
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut s = ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .unwrap();
            let mut hi = [0u8; 2];
            s.read_exact(&mut hi).await.unwrap();
            // The client sends nothing more: the read waits, idle.
            let mut more = [0u8; 1];
            let idle = std::time::Duration::from_millis(200);
            assert!(tokio::time::timeout(idle, s.read(&mut more)).await.is_err());
            assert!(handed_over(&s));
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let mut c = connect(addr, setup.client).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut got = Vec::new();
        // read_to_end fails with UnexpectedEof unless close_notify came.
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }

    /// The first bytes a rustls client with `versions` sends.
    fn client_hello(versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
        let config = setup(MinVersion::Tls12, versions).client;
        let name = ServerName::try_from("api.test").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Accept one connection, send `bytes` to it and close; returns the
    /// server's error and what the client received.
    async fn refused(bytes: Vec<u8>) -> (Refused, Vec<u8>) {
        let setup = setup(MinVersion::Tls12, &[&rustls::version::TLS13]);
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .err()
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&bytes).await.unwrap();
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the handshake ends without the client closing")
            .expect("the handshake does not panic")
            .expect("the handshake fails");
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got).await;
        (err, got)
    }

    fn too_large(e: &Refused) -> bool {
        e.reason == Reason::HelloTooLarge
            && e.error
                .get_ref()
                .and_then(|i| i.downcast_ref::<HelloError>())
                .is_some_and(|h| *h == HelloError::TooLarge { limit: HELLO_MAX })
    }

    #[tokio::test]
    async fn a_hello_declaring_more_than_the_limit_is_refused_at_once() {
        for declared in [HELLO_MAX as u32, 0x1_0000, 0xb7_01fc, 0xff_ffff] {
            let mut hello = client_hello(&[&rustls::version::TLS13]);
            hello[6..9].copy_from_slice(&declared.to_be_bytes()[1..]);
            let (err, got) = refused(hello).await;
            assert!(too_large(&err), "{declared:#x}: {err:?}");
            assert_eq!(got, ALERT_DECODE_ERROR, "{declared:#x}");
        }
    }

    #[tokio::test]
    async fn a_hello_in_tiny_records_past_the_limit_is_refused() {
        // A hello that declares 8 KiB and comes one byte per record: the
        // message fits the limit, its records do not.
        let mut body = vec![0x01, 0x00, 0x20, 0x00];
        body.resize(4 + 0x2000, 0);
        let mut wire = Vec::new();
        for b in body {
            wire.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, b]);
        }
        let (err, got) = refused(wire).await;
        assert!(too_large(&err), "{err:?}");
        assert_eq!(got, ALERT_DECODE_ERROR);
    }

    #[tokio::test]
    async fn plain_http_is_refused_as_not_tls() {
        let (err, _) = refused(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n".to_vec()).await;
        assert_eq!(err.reason, Reason::NotTls, "{err}");
        assert_eq!(err.sni, None);
        assert!(!err.silent);
    }

    #[tokio::test]
    async fn an_oversized_message_after_the_hello_fails_without_a_panic() {
        // TLS 1.2 keeps the client's second flight in plaintext: a
        // ClientKeyExchange declaring 64 KiB behind a real hello reaches
        // rustls, which refuses it while holding a position in the input.
        let mut wire = client_hello(&[&rustls::version::TLS12]);
        wire.extend_from_slice(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x10, 0x01, 0x00, 0x00]);
        let (err, _) = refused(wire).await;
        assert_eq!(err.reason, Reason::ProtocolError);
        assert_eq!(err.sni.as_deref(), Some("api.test"));
        let inner = err
            .error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(
                inner,
                Some(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::HandshakePayloadTooLarge
                ))
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_handshake_sends_the_alert() {
        let setup = setup(MinVersion::Tls13, &[&rustls::version::TLS12]);
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            ServerStream::accept(tcp, setup.server, HELLO_MAX)
                .await
                .err()
                .unwrap()
        });
        let err = connect(addr, setup.client).await.err().unwrap();
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(inner, Some(rustls::Error::AlertReceived(_))),
            "client saw {err:?}"
        );
        let server_err = server.await.unwrap();
        assert_eq!(server_err.reason, Reason::NoSharedVersion, "{server_err}");
        assert!(server_err
            .error
            .get_ref()
            .is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some()));
    }
}
