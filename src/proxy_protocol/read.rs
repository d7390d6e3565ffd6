//! Taking one PROXY header off an accepted socket, and not a byte more:
//! what follows (a TLS ClientHello, say) stays in the socket for the
//! passthrough peek, the TLS handshake or the splice.

use std::io;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::parse::{parse, Header, ParseError, Parsed};

/// Bytes peeked: a version 1 header (107 at most), or a version 2 one
/// with IPv6 addresses (52) and some TLVs. A longer version 2 header is
/// read once its length field is known.
const PEEK_LEN: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    /// Short label for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::Parse(e) => e.reason(),
            ReadError::Timeout(_) => "timeout",
            ReadError::Closed => "closed",
            ReadError::Io(_) => "io",
        }
    }
}

/// Wait (at most `timeout`) for a complete header at the start of
/// `stream`, and consume exactly its bytes.
pub async fn read_header(stream: &TcpStream, timeout: Duration) -> Result<Header, ReadError> {
    match tokio::time::timeout(timeout, read_loop(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::Timeout(timeout)),
    }
}

async fn read_loop(stream: &TcpStream) -> Result<Header, ReadError> {
    let mut buf = [0u8; PEEK_LEN];
    let mut seen = 0;
    let mut backoff = MIN_BACKOFF;
    let mut peer_closed = false;
    loop {
        // With nothing queued, peek waits for readability; with bytes
        // queued it returns them at once, every time: a header that came
        // in pieces is waited for with the sleep below.
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        if n > seen {
            seen = n;
            backoff = MIN_BACKOFF;
            match parse(&buf[..n])? {
                Parsed::Complete(header) => {
                    read_exact(stream, &mut buf[..header.len]).await?;
                    return Ok(header);
                }
                Parsed::Partial { total: Some(total) } if total > buf.len() => {
                    // Its length is known (and bounded): read all of it.
                    let mut whole = vec![0u8; total];
                    read_exact(stream, &mut whole).await?;
                    return match parse(&whole)? {
                        Parsed::Complete(header) => Ok(header),
                        Parsed::Partial { .. } => Err(ReadError::Closed),
                    };
                }
                Parsed::Partial { .. } => {}
            }
        }
        if peer_closed {
            return Err(ReadError::Closed);
        }
        // Peek cannot see a FIN behind unread bytes; the readiness can.
        if stream.ready(Interest::READABLE).await?.is_read_closed() {
            peer_closed = true;
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn read_exact(stream: &TcpStream, buf: &mut [u8]) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.readable().await?;
        match stream.try_read(&mut buf[filled..]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy_protocol::{encode, Version};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn consumes_the_header_and_nothing_after_it() {
        for wire in [
            encode(
                Version::V1,
                "192.0.2.7:5000".parse().unwrap(),
                "10.0.0.1:443".parse().unwrap(),
            ),
            encode(
                Version::V2,
                "192.0.2.7:5000".parse().unwrap(),
                "10.0.0.1:443".parse().unwrap(),
            ),
        ] {
            let (mut client, mut server) = pair().await;
            // The header in pieces, the payload right behind its last one.
            let (a, b) = wire.split_at(7);
            client.write_all(a).await.unwrap();
            let rest = [b, b"payload".as_slice()].concat();
            let writer = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                client.write_all(&rest).await.unwrap();
                client
            });
            let h = read_header(&server, Duration::from_secs(5)).await.unwrap();
            assert_eq!(h.len, wire.len());
            assert_eq!(
                h.addresses.unwrap().source,
                "192.0.2.7:5000".parse().unwrap()
            );
            let _client = writer.await.unwrap();
            let mut rest = [0u8; 7];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"payload");
        }
    }

    #[tokio::test]
    async fn reads_a_v2_header_longer_than_the_peek() {
        let (mut client, mut server) = pair().await;
        let mut wire = crate::proxy_protocol::parse::V2_SIGNATURE.to_vec();
        let mut block = vec![127, 0, 0, 9, 127, 0, 0, 1, 0, 1, 0, 2];
        // One NOOP TLV of 600 bytes.
        block.extend([0x04, 0x02, 0x58]);
        block.extend([0u8; 600]);
        wire.extend([0x21, 0x11]);
        wire.extend((block.len() as u16).to_be_bytes());
        wire.extend(block);
        wire.extend(b"after");
        client.write_all(&wire).await.unwrap();
        let h = read_header(&server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.len, wire.len() - 5);
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"after");
    }

    #[tokio::test]
    async fn refuses_garbage_at_once_and_times_out_on_silence() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let err = read_header(&server, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "not_proxy");

        let (mut client, server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.unwrap();
        let err = read_header(&server, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "timeout");

        let (mut client, server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.unwrap();
        drop(client);
        let err = read_header(&server, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "closed");
    }
}
