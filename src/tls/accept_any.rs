//! A server-certificate verifier that accepts any certificate, for the
//! clients that must not judge one: the TLS health probe (it asks only
//! whether a handshake completes, like HAProxy's `check-ssl verify none`),
//! the device simulator against a self-signed test server, and the
//! benchmarks' load client (wrk does not check either).
//!
//! The handshake signature is still verified with the provider's
//! algorithms: the client does the same public-key work as a verifying
//! one, bar the chain walk, and a peer that cannot sign is still refused.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts every server certificate; checks handshake signatures.
#[derive(Debug)]
pub struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl AcceptAnyServerCert {
    /// Signatures are checked with `provider`'s algorithms (use the one the
    /// client configuration is built with).
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<AcceptAnyServerCert> {
        Arc::new(AcceptAnyServerCert(provider))
    }
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
