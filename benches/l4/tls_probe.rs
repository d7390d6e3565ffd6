//! One HTTPS request with a given SNI, to tell when a passthrough port
//! routes to the TLS origin. Blocking rustls; the certificate is not
//! checked (the origin's is self-signed, and wrk checks nothing either).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use fleetgate::tls::accept_any::AcceptAnyServerCert;
use rustls::crypto::ring;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

const IO_LIMIT: Duration = Duration::from_secs(2);

/// GET / through 127.0.0.1:`port`, presenting `server_name` as SNI; Ok
/// once the answer is a 200.
pub fn https_ok(port: u16, server_name: &str) -> Result<()> {
    let provider = Arc::new(ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new(provider))
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string())?;
    let conn = ClientConnection::new(Arc::new(config), name)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = TcpStream::connect_timeout(&addr, IO_LIMIT)?;
    tcp.set_read_timeout(Some(IO_LIMIT))?;
    tcp.set_write_timeout(Some(IO_LIMIT))?;
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {server_name}\r\n\r\n").as_bytes())?;
    // The status line is all we need; the connection is dropped after it.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            bail!("closed before a status line");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        bail!("unexpected response: {status}");
    }
    Ok(())
}
