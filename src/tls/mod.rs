//! TLS building blocks that listeners assemble:
//!
//! - [`client_hello`]: peek at a ClientHello (SNI, ALPN) without consuming
//!   it, for passthrough routing.
//! - [`certs`]: PEM loading, key/certificate consistency, CA bundles and
//!   self-signed certificates for `cert = "auto"`.
//! - [`server`]: a `rustls::ServerConfig` from plain values (SNI-selected
//!   certificates, versions, suites, ALPN, resumption, client auth).
//! - [`server_stream`]: a terminated TLS connection as a tokio stream that
//!   holds no buffer while idle (rustls' unbuffered API).
//! - [`refusal`]: why a handshake was refused, as a bounded set of
//!   reasons for the metric label and the log line.
//! - [`v1_client`]: X.509 version 1 client certificates, which webpki
//!   refuses, when a client CA issued them directly.
//! - [`revocation`]: a shared, hot-swappable set of revoked device
//!   certificates that the client-auth verifier consults.
//! - [`forward`]: the forms a client certificate is passed to backends in
//!   (nginx-compatible escaped PEM, subject DN, fingerprints).
//! - [`upstream`]: a `rustls::ClientConfig` for re-encrypting to backends.
//! - [`inventory`]: the certificates a plan uses, their expiry metric and
//!   warnings.
//! - [`accept_any`]: the verifier of clients that accept any server
//!   certificate (TLS health probes, the simulator, the benchmarks).
//!
//! Everything uses rustls' *ring* provider, as the rest of the crate does.

pub mod accept_any;
pub mod certs;
pub mod client_hello;
mod error;
pub mod forward;
pub mod inventory;
pub mod records;
pub mod refusal;
pub mod revocation;
pub mod server;
pub mod server_stream;
pub mod upstream;
pub mod v1_client;
mod x509;

#[cfg(test)]
mod testutil;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::SupportedProtocolVersion;

pub use error::TlsError;

/// The lowest protocol version a listener or an upstream connection accepts.
/// TLS 1.2 stays the default: embedded devices in the field often have
/// nothing newer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    #[default]
    Tls12,
    Tls13,
}

impl MinVersion {
    pub(crate) fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS12_UP: &[&SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            MinVersion::Tls12 => TLS12_UP,
            MinVersion::Tls13 => TLS13_ONLY,
        }
    }
}

/// The crypto provider every config here is built on.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lowercase hex, the form fingerprints and serials are compared in.
pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}
