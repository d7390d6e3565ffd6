//! Peek at a TLS ClientHello for passthrough routing (SNI, ALPN) without
//! terminating TLS.
//!
//! The parser takes whatever bytes have arrived so far and answers "need
//! more", "here is the hello" or "reject, and why". It reassembles a
//! handshake message split over several TLS records (clients with large
//! post-quantum key shares or many extensions do that) and over TCP
//! segments, checks every length against what is left, and never panics
//! or allocates more than the handshake cap on any input.
//!
//! [`peek_client_hello`] reads with `MSG_PEEK`, so not a byte is consumed:
//! after routing, the backend receives the client's exact bytes.

use std::io;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Handshake bytes allowed by default. A ClientHello is typically 250–2000
/// bytes; 16 KiB leaves room for large PSK tickets and hybrid key shares.
pub const DEFAULT_MAX_HANDSHAKE: usize = 16 * 1024;

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
pub(crate) const RECORD_HEADER_LEN: usize = 5;
pub(crate) const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const SNI_HOST_NAME: u8 = 0;

/// What a ClientHello says that routing can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` from server_name, lowercased; `None` when absent or
    /// an IP literal (which RFC 6066 forbids and rustls also ignores).
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order of preference.
    pub alpn: Vec<Vec<u8>>,
    /// ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
    /// The supported_versions extension as sent, GREASE values included;
    /// empty when absent (a pre-1.3 client).
    pub supported_versions: Vec<u16>,
    /// Bytes of the stream, record headers included, up to the last byte
    /// of the ClientHello.
    pub wire_len: usize,
    /// ClientHello.random: what a key log names the connection by.
    pub random: [u8; 32],
}

impl ClientHelloInfo {
    /// The highest version offered, ignoring GREASE (RFC 8701).
    pub fn max_version(&self) -> u16 {
        self.supported_versions
            .iter()
            .copied()
            .filter(|v| !is_grease(*v))
            .max()
            .unwrap_or(self.legacy_version)
    }

    /// ALPN names that are UTF-8 (all registered ones are).
    pub fn alpn_strs(&self) -> impl Iterator<Item = &str> {
        self.alpn.iter().filter_map(|p| std::str::from_utf8(p).ok())
    }
}

fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && (v >> 8) == (v & 0xff)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Everything so far is consistent; the hello is not complete yet.
    NeedMore,
    Hello(ClientHelloInfo),
}

/// Why a connection is rejected; [`HelloError::reason`] is the short label
/// for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not TLS: {0}")]
    NotTls(&'static str),
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("first handshake message has type {0}, not ClientHello")]
    NoClientHello(u8),
}

impl HelloError {
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls(_) => "not_tls",
            HelloError::Malformed(_) => "malformed",
            HelloError::TooLarge { .. } => "too_large",
            HelloError::NoClientHello(_) => "no_client_hello",
        }
    }
}

/// Parse with the default 16 KiB handshake cap.
pub fn parse(buf: &[u8]) -> Result<Parsed, HelloError> {
    parse_with_limit(buf, DEFAULT_MAX_HANDSHAKE)
}

/// Parse the bytes received so far; `max_handshake` caps the ClientHello
/// message (its 4-byte handshake header included).
pub fn parse_with_limit(buf: &[u8], max_handshake: usize) -> Result<Parsed, HelloError> {
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let first = pos == 0;
        let rest = &buf[pos..];
        check_record_header(rest, first)?;
        if rest.len() < RECORD_HEADER_LEN {
            return Ok(Parsed::NeedMore);
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 {
            // RFC 8446 5.1 forbids zero-length handshake fragments.
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(HelloError::Malformed("record longer than 2^14 bytes"));
        }
        let payload_start = pos + RECORD_HEADER_LEN;
        let available = len.min(buf.len() - payload_start);
        let payload = &buf[payload_start..payload_start + available];

        // The message so far: a view of this record when it is the first,
        // else the reassembly buffer.
        let before = handshake.len();
        let message: &[u8] = if first {
            payload
        } else {
            handshake.extend_from_slice(payload);
            &handshake
        };
        if let Some(&kind) = message.first() {
            if kind != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NoClientHello(kind));
            }
        }
        if message.len() >= HANDSHAKE_HEADER_LEN {
            let body_len = usize::from(message[1]) << 16
                | usize::from(message[2]) << 8
                | usize::from(message[3]);
            let total = HANDSHAKE_HEADER_LEN + body_len;
            if total > max_handshake {
                return Err(HelloError::TooLarge {
                    limit: max_handshake,
                });
            }
            if message.len() >= total {
                let mut info = parse_body(&message[HANDSHAKE_HEADER_LEN..total])?;
                // Bytes of this record that belong to the hello.
                let used = total - before;
                info.wire_len = payload_start + used;
                return Ok(Parsed::Hello(info));
            }
        }
        if available < len {
            return Ok(Parsed::NeedMore);
        }
        if first {
            handshake.reserve(max_handshake.min(2 * len));
            handshake.extend_from_slice(payload);
        }
        pos = payload_start + len;
    }
}

/// Validate the record header bytes that have arrived (possibly fewer than
/// five), so that a plaintext protocol is turned away at its first byte.
fn check_record_header(header: &[u8], first: bool) -> Result<(), HelloError> {
    let fail = |why| {
        if first {
            HelloError::NotTls(why)
        } else {
            HelloError::Malformed(why)
        }
    };
    if let Some(&kind) = header.first() {
        if kind != CONTENT_HANDSHAKE {
            return Err(if first {
                HelloError::NotTls("first byte is not a TLS handshake record")
            } else {
                HelloError::Malformed("non-handshake record inside the ClientHello")
            });
        }
    }
    if let Some(&major) = header.get(1) {
        if major != 3 {
            return Err(fail("record version is not 3.x"));
        }
    }
    if let Some(&minor) = header.get(2) {
        // SSL 3.0 (3.0) up to TLS 1.3 (3.4); clients send 3.1 or 3.3 here.
        if minor > 4 {
            return Err(fail("unknown record version"));
        }
    }
    Ok(())
}

/// Bounds-checked reads over a byte slice; every failure is "malformed".
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if n > self.buf.len() {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = usize::from(self.u8(what)?);
        Ok(Reader::new(self.take(n, what)?))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = usize::from(self.u16(what)?);
        Ok(Reader::new(self.take(n, what)?))
    }
}

/// The ClientHello body, RFC 8446 4.1.2 (and RFC 5246 7.4.1.2, where the
/// extensions block may be absent).
fn parse_body(body: &[u8]) -> Result<ClientHelloInfo, HelloError> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("truncated legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(HelloError::Malformed("legacy_version is not 3.x"));
    }
    let random: [u8; 32] = r
        .take(32, "truncated random")?
        .try_into()
        .expect("32 bytes were taken");
    let session_id = r.vec8("truncated session id")?;
    if session_id.buf.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("truncated cipher suites")?;
    if suites.buf.is_empty() || !suites.buf.len().is_multiple_of(2) {
        return Err(HelloError::Malformed("bad cipher suite list"));
    }
    let compression = r.vec8("truncated compression methods")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut info = ClientHelloInfo {
        sni: None,
        alpn: Vec::new(),
        legacy_version,
        supported_versions: Vec::new(),
        wire_len: 0,
        random,
    };
    if r.is_empty() {
        return Ok(info);
    }
    let mut exts = r.vec16("truncated extensions")?;
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !exts.is_empty() {
        let kind = exts.u16("truncated extension")?;
        let mut data = exts.vec16("truncated extension")?;
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => info.sni = parse_sni(&mut data)?,
            EXT_ALPN => info.alpn = parse_alpn(&mut data)?,
            EXT_SUPPORTED_VERSIONS => {
                let mut list = data.vec8("truncated supported_versions")?;
                if list.is_empty() || !list.buf.len().is_multiple_of(2) {
                    return Err(HelloError::Malformed("bad supported_versions"));
                }
                while !list.is_empty() {
                    info.supported_versions
                        .push(list.u16("bad supported_versions")?);
                }
            }
            _ => continue,
        }
        if !data.is_empty() {
            return Err(HelloError::Malformed("bytes after an extension's list"));
        }
    }
    // RFC 8446 4.2: no extension type may appear twice.
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return Err(HelloError::Malformed("duplicate extension"));
    }
    Ok(info)
}

/// server_name, RFC 6066 3.
fn parse_sni(data: &mut Reader<'_>) -> Result<Option<String>, HelloError> {
    let mut list = data.vec16("truncated server_name list")?;
    if list.is_empty() {
        return Err(HelloError::Malformed("empty server_name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8("truncated server_name")?;
        let name = list.vec16("truncated server_name")?.buf;
        if kind != SNI_HOST_NAME {
            // No other name type is defined; skip it like OpenSSL does.
            continue;
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host_name entries"));
        }
        host = Some(name);
    }
    let Some(name) = host else {
        return Ok(None);
    };
    let Ok(text) = std::str::from_utf8(name) else {
        return Err(HelloError::Malformed("server_name is not ASCII"));
    };
    if text.parse::<std::net::IpAddr>().is_ok() {
        return Ok(None);
    }
    if !is_dns_name(name) {
        return Err(HelloError::Malformed("server_name is not a DNS name"));
    }
    Ok(Some(text.to_ascii_lowercase()))
}

/// A hostname as servers see them: letters, digits, `-` and `_` (seen in
/// internal names), labels of 1–63 bytes, 253 bytes in all, no trailing dot.
fn is_dns_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split(|&b| b == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// application_layer_protocol_negotiation, RFC 7301 3.1.
fn parse_alpn(data: &mut Reader<'_>) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut list = data.vec16("truncated ALPN list")?;
    if list.is_empty() {
        return Err(HelloError::Malformed("empty ALPN list"));
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let name = list.vec8("truncated ALPN name")?;
        if name.is_empty() {
            return Err(HelloError::Malformed("empty ALPN name"));
        }
        out.push(name.buf.to_vec());
    }
    Ok(out)
}

/// Failure to obtain a ClientHello from a socket.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("client closed the connection before a complete ClientHello")]
    Closed,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

impl PeekError {
    /// Short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PeekError::Hello(e) => e.reason(),
            PeekError::Timeout(_) => "timeout",
            PeekError::Closed => "closed",
            PeekError::Io(_) => "io",
        }
    }
}

/// First peek buffer; most hellos fit, larger ones grow it.
const INITIAL_PEEK: usize = 2048;
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// Wait until the socket holds a complete ClientHello and parse it,
/// leaving every byte in the socket for the backend.
///
/// `max_bytes` caps the bytes peeked (record headers included) and the
/// handshake message; `timeout` caps the whole wait, slow clients included.
pub async fn peek_client_hello(
    stream: &TcpStream,
    max_bytes: usize,
    timeout: Duration,
) -> Result<ClientHelloInfo, PeekError> {
    match tokio::time::timeout(timeout, peek_loop(stream, max_bytes)).await {
        Ok(result) => result,
        Err(_) => Err(PeekError::Timeout(timeout)),
    }
}

async fn peek_loop(stream: &TcpStream, max_bytes: usize) -> Result<ClientHelloInfo, PeekError> {
    let max_bytes = max_bytes.max(RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN);
    let mut buf = vec![0u8; INITIAL_PEEK.min(max_bytes)];
    let mut seen = 0;
    let mut backoff = MIN_BACKOFF;
    let mut peer_closed = false;
    loop {
        // With nothing queued, peek waits for readability. With unread
        // bytes queued the socket stays readable, so peek (and readable())
        // return at once with the same bytes: that case sleeps below.
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(PeekError::Closed);
        }
        if n > seen {
            seen = n;
            backoff = MIN_BACKOFF;
            if let Parsed::Hello(info) = parse_with_limit(&buf[..n], max_bytes)? {
                return Ok(info);
            }
            if n == buf.len() {
                if n >= max_bytes {
                    return Err(HelloError::TooLarge { limit: max_bytes }.into());
                }
                // The buffer was the limit, not the data: look again at once.
                let grown = (buf.len() * 2).min(max_bytes);
                buf.resize(grown, 0);
                continue;
            }
        }
        if peer_closed {
            return Err(PeekError::Closed);
        }
        // Peek cannot see a FIN behind unread bytes; the readiness can
        // (EPOLLRDHUP). Bytes that came just before the FIN get one more
        // peek before giving up.
        if stream.ready(Interest::READABLE).await?.is_read_closed() {
            peer_closed = true;
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// The bytes a real rustls client sends first.
    fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frame a single-record hello into records of `size` payload bytes.
    fn reframe(wire: &[u8], size: usize) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        let handshake = &wire[5..5 + len];
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn hello(buf: &[u8]) -> ClientHelloInfo {
        match parse(buf) {
            Ok(Parsed::Hello(info)) => info,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    /// A hand-built ClientHello with the given extensions, for the cases a
    /// real client never sends.
    fn synthetic(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut ext_bytes = Vec::new();
        for (kind, data) in exts {
            ext_bytes.extend_from_slice(&kind.to_be_bytes());
            ext_bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        wrap(&body)
    }

    fn wrap(body: &[u8]) -> Vec<u8> {
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![SNI_HOST_NAME];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (EXT_SERVER_NAME, data)
    }

    #[test]
    fn rustls_hello_gives_sni_and_alpn() {
        let wire = rustls_hello("devices.example.com", &[b"h2", b"http/1.1"]);
        let info = hello(&wire);
        assert_eq!(info.sni.as_deref(), Some("devices.example.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(info.legacy_version, 0x0303);
        assert!(info.supported_versions.contains(&0x0304));
        assert!(info.supported_versions.contains(&0x0303));
        assert_eq!(info.max_version(), 0x0304);
        assert_eq!(info.wire_len, wire.len());
        assert_eq!(info.alpn_strs().collect::<Vec<_>>(), ["h2", "http/1.1"]);
    }

    #[test]
    fn ip_server_name_means_no_sni() {
        let wire = rustls_hello("192.0.2.7", &[]);
        let info = hello(&wire);
        assert_eq!(info.sni, None);
        assert!(info.alpn.is_empty());
        // A client that sends the IP anyway is treated the same.
        assert_eq!(hello(&synthetic(&[sni_ext(b"192.0.2.7")])).sni, None);
    }

    #[test]
    fn sni_is_lowercased_and_validated() {
        let info = hello(&synthetic(&[sni_ext(b"Gateway.EXAMPLE.com")]));
        assert_eq!(info.sni.as_deref(), Some("gateway.example.com"));
        assert_eq!(
            hello(&synthetic(&[sni_ext(b"_srv.internal")]))
                .sni
                .as_deref(),
            Some("_srv.internal")
        );
        for bad in [
            &b"bad name.example"[..],
            b"trailing.dot.",
            b"..",
            b"caf\xc3\xa9.example",
            b"nul\0.example",
            &[b'a'; 64][..],
        ] {
            assert_eq!(
                parse(&synthetic(&[sni_ext(bad)])).unwrap_err().reason(),
                "malformed",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn one_byte_at_a_time_needs_more_until_complete() {
        let wire = rustls_hello("a.example", &[b"h2"]);
        for end in 0..wire.len() {
            assert_eq!(parse(&wire[..end]), Ok(Parsed::NeedMore), "prefix {end}");
        }
        assert_eq!(hello(&wire).sni.as_deref(), Some("a.example"));
    }

    #[test]
    fn hello_fragmented_over_records() {
        let wire = rustls_hello("frag.example", &[b"mqtt"]);
        let framed = reframe(&wire, 50);
        assert!(framed.len() >= wire.len() + 5 * 3, "several records");
        for end in 0..framed.len() {
            assert_eq!(parse(&framed[..end]), Ok(Parsed::NeedMore), "prefix {end}");
        }
        let info = hello(&framed);
        assert_eq!(info.sni.as_deref(), Some("frag.example"));
        assert_eq!(info.alpn, vec![b"mqtt".to_vec()]);
        assert_eq!(info.wire_len, framed.len());
        // Bytes after the hello (early data, say) do not disturb it.
        let mut more = framed.clone();
        more.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3]);
        assert_eq!(hello(&more).wire_len, framed.len());
        // One-byte records work as well.
        assert_eq!(
            hello(&reframe(&wire, 1)).sni.as_deref(),
            Some("frag.example")
        );
    }

    #[test]
    fn non_tls_is_rejected_at_the_first_byte() {
        for input in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"\x80\x2e\x01",
            b"SSH-2.0",
        ] {
            assert_eq!(parse(input).unwrap_err().reason(), "not_tls", "{input:?}");
        }
        assert_eq!(parse(b"\x16\x02").unwrap_err().reason(), "not_tls");
        assert_eq!(parse(b"\x16\x03\x09").unwrap_err().reason(), "not_tls");
        assert_eq!(parse(b""), Ok(Parsed::NeedMore));
        assert_eq!(parse(b"\x16\x03"), Ok(Parsed::NeedMore));
    }

    #[test]
    fn other_handshake_messages_are_not_a_hello() {
        // A ServerHello (type 2) sent to a server.
        let err = parse(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]).unwrap_err();
        assert_eq!(err, HelloError::NoClientHello(2));
        assert_eq!(err.reason(), "no_client_hello");
    }

    #[test]
    fn truncated_and_inconsistent_inputs_are_malformed() {
        let wire = rustls_hello("t.example", &[b"h2"]);
        // The message claims more than the record carries, then a non-
        // handshake record follows.
        let mut cut = wire.clone();
        let short = 100u16;
        cut[3..5].copy_from_slice(&short.to_be_bytes());
        cut.truncate(5 + 100);
        cut.extend_from_slice(&[0x15, 3, 3, 0, 2, 2, 40]);
        assert_eq!(parse(&cut).unwrap_err().reason(), "malformed");

        // A record length field that disagrees with the body inside.
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[40]); // session id longer than the rest
        assert_eq!(parse(&wrap(&body)).unwrap_err().reason(), "malformed");

        // Empty record, oversized record.
        assert_eq!(
            parse(&[0x16, 3, 1, 0, 0]).unwrap_err().reason(),
            "malformed"
        );
        assert_eq!(
            parse(&[0x16, 3, 1, 0x40, 1]).unwrap_err().reason(),
            "malformed"
        );

        // Trailing bytes after extensions, duplicate extensions.
        let mut trailing = synthetic(&[sni_ext(b"x.example")]);
        trailing.push(0);
        let n = trailing.len();
        let rec_len = (n - 5) as u16;
        trailing[3..5].copy_from_slice(&rec_len.to_be_bytes());
        let body_len = (n - 9) as u32;
        trailing[6..9].copy_from_slice(&body_len.to_be_bytes()[1..]);
        assert_eq!(parse(&trailing).unwrap_err().reason(), "malformed");
        let dup = synthetic(&[sni_ext(b"a.example"), sni_ext(b"b.example")]);
        assert_eq!(parse(&dup).unwrap_err().reason(), "malformed");

        // Empty ALPN name, empty ALPN list.
        let bad_alpn = synthetic(&[(EXT_ALPN, vec![0, 1, 0])]);
        assert_eq!(parse(&bad_alpn).unwrap_err().reason(), "malformed");
        let empty_alpn = synthetic(&[(EXT_ALPN, vec![0, 0])]);
        assert_eq!(parse(&empty_alpn).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn hello_without_extensions_is_accepted() {
        let mut body = vec![0x03, 0x01];
        body.extend_from_slice(&[1; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x00, 0x2f, 1, 0]);
        let info = hello(&wrap(&body));
        assert_eq!(info.sni, None);
        assert_eq!(info.max_version(), 0x0301);
    }

    #[test]
    fn oversized_hello_is_rejected_from_its_header() {
        // Only the headers have arrived; the announced size is enough.
        let header = [0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x40, 0x00];
        assert_eq!(
            parse(&header),
            Err(HelloError::TooLarge {
                limit: DEFAULT_MAX_HANDSHAKE
            })
        );
        let wire = rustls_hello("big.example", &[]);
        assert_eq!(
            parse_with_limit(&wire, 100).unwrap_err().reason(),
            "too_large"
        );
        // A hello of 20 KiB over two records, allowed by a larger cap.
        let padding = vec![0u8; 20 * 1024];
        let big = synthetic(&[sni_ext(b"big.example"), (21, padding)]);
        let framed = reframe(&big, 16 * 1024);
        assert_eq!(parse(&framed).unwrap_err().reason(), "too_large");
        match parse_with_limit(&framed, 32 * 1024) {
            Ok(Parsed::Hello(info)) => assert_eq!(info.sni.as_deref(), Some("big.example")),
            other => panic!("{other:?}"),
        }
    }

    /// xorshift64*: fixed seed, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn prefixes_and_corruptions_never_panic() {
        let wire = rustls_hello("fuzz.example", &[b"h2", b"http/1.1"]);
        let framed = reframe(&wire, 37);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for base in [&wire, &framed] {
            for end in 0..=base.len() {
                let _ = parse(&base[..end]);
            }
            for _ in 0..4000 {
                let mut input = base.to_vec();
                match rng.below(4) {
                    0 => {
                        for _ in 0..1 + rng.below(4) {
                            let i = rng.below(input.len());
                            input[i] = rng.next() as u8;
                        }
                    }
                    1 => {
                        // Length fields are where parsers die: hit bytes
                        // early in the message harder.
                        let i = rng.below(input.len().min(120));
                        input[i] = [0x00, 0xff, 0x7f, 0x80, 0x01][rng.below(5)];
                    }
                    2 => input.truncate(rng.below(input.len())),
                    _ => {
                        let i = rng.below(input.len());
                        let n = rng.below(8);
                        for _ in 0..n {
                            input.insert(i, rng.next() as u8);
                        }
                    }
                }
                let _ = parse(&input);
                let _ = parse_with_limit(&input, rng.below(4096));
            }
        }
        for _ in 0..2000 {
            let mut input: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
            if !input.is_empty() && rng.below(2) == 0 {
                input[0] = 0x16;
            }
            let _ = parse(&input);
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn peek_waits_for_pieces_and_consumes_nothing() {
        let wire = reframe(&rustls_hello("peek.example", &[b"h2"]), 100);
        let (mut client, server) = pair().await;
        let sent = wire.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(70) {
                client.write_all(chunk).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            client.write_all(b"after").await.unwrap();
            client
        });
        let info = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(info.sni.as_deref(), Some("peek.example"));
        let _client = writer.await.unwrap();
        // Every byte is still there for the backend.
        let mut server = server;
        let mut got = vec![0u8; wire.len() + 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..wire.len()], &wire[..]);
        assert_eq!(&got[wire.len()..], b"after");
    }

    #[tokio::test]
    async fn peek_grows_its_buffer_for_a_large_hello() {
        let big = synthetic(&[sni_ext(b"large.example"), (21, vec![0; 6000])]);
        let (mut client, server) = pair().await;
        client.write_all(&big).await.unwrap();
        let info = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(info.sni.as_deref(), Some("large.example"));
        assert_eq!(info.wire_len, big.len());
    }

    #[tokio::test]
    async fn peek_rejects_plaintext_at_once() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "not_tls");
    }

    #[tokio::test]
    async fn peek_times_out_on_a_stalled_client() {
        let wire = rustls_hello("slow.example", &[]);
        let (mut client, server) = pair().await;
        client.write_all(&wire[..wire.len() / 2]).await.unwrap();
        let started = std::time::Instant::now();
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "timeout");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn peek_reports_a_close_mid_hello() {
        let wire = rustls_hello("gone.example", &[]);
        let (mut client, server) = pair().await;
        client.write_all(&wire[..10]).await.unwrap();
        drop(client);
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        // Peek keeps returning the ten queued bytes, never 0; the FIN is
        // seen through the socket's read-closed readiness instead.
        assert_eq!(err.reason(), "closed", "{err}");
    }

    #[tokio::test]
    async fn peek_reports_a_close_before_any_byte() {
        let (client, server) = pair().await;
        drop(client);
        let err = peek_client_hello(&server, 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "closed");
    }

    #[tokio::test]
    async fn peek_enforces_the_byte_cap() {
        let wire = rustls_hello("cap.example", &[]);
        let (mut client, server) = pair().await;
        client.write_all(&wire).await.unwrap();
        let err = peek_client_hello(&server, 64, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "too_large");
    }
}
