//! Revoking device certificates without a CRL: a shared set of SHA-256
//! fingerprints and serial numbers that the client-certificate verifier
//! consults on every full handshake. The device-management side updates it
//! (one device at a time or by replacing the whole set); the handshake
//! path only reads it, through an `ArcSwap`, so neither waits for the other.
//!
//! A resumed TLS session skips certificate verification: rustls restores
//! the client certificate from the session ticket or cache without calling
//! the verifier. A device revoked after its last full handshake could
//! resume, so listeners must also call [`RevocationList::check_peer`]
//! after every handshake (it is one hash and one lookup).

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::forward::{serial_magnitude, sha256};
use super::{x509, TlsError};

#[derive(Debug, Default, Clone)]
struct Revoked {
    fingerprints: HashSet<[u8; 32]>,
    /// Serial magnitudes (no sign byte, no leading zeros).
    serials: HashSet<Vec<u8>>,
}

/// The revoked device certificates. Clones share one set.
///
/// Serials are matched regardless of issuer: a serial is unique per CA,
/// so this is exact for listeners that trust one device CA. Where several
/// CAs are trusted, revoke by fingerprint.
#[derive(Debug, Clone, Default)]
pub struct RevocationList {
    inner: Arc<ArcSwap<Revoked>>,
}

impl RevocationList {
    pub fn new() -> Self {
        Self::default()
    }

    /// Revoke by SHA-256 of the DER certificate.
    pub fn revoke_fingerprint(&self, sha256: [u8; 32]) {
        self.inner.rcu(|r| {
            let mut r = Revoked::clone(r);
            r.fingerprints.insert(sha256);
            r
        });
    }

    /// Revoke by a hex SHA-256 fingerprint (`ab12..` or `AB:12:..`).
    pub fn revoke_fingerprint_hex(&self, hex: &str) -> Result<(), TlsError> {
        let bytes = parse_hex(hex)?;
        let fingerprint: [u8; 32] = bytes.try_into().map_err(|_| {
            TlsError::Config(format!(
                "`{hex}` is not a SHA-256 fingerprint (64 hex digits)"
            ))
        })?;
        self.revoke_fingerprint(fingerprint);
        Ok(())
    }

    /// Revoke by serial number, big-endian bytes (leading zeros ignored).
    pub fn revoke_serial(&self, serial: &[u8]) {
        let serial = normalize_serial(serial);
        self.inner.rcu(|r| {
            let mut r = Revoked::clone(r);
            r.serials.insert(serial.clone());
            r
        });
    }

    /// Revoke by serial number in hex, as [`super::forward::serial_hex`]
    /// and `openssl x509 -serial` print it (colons allowed).
    pub fn revoke_serial_hex(&self, hex: &str) -> Result<(), TlsError> {
        let bytes = parse_hex(hex)?;
        self.revoke_serial(&bytes);
        Ok(())
    }

    /// Undo a revocation by fingerprint.
    pub fn reinstate_fingerprint(&self, sha256: &[u8; 32]) {
        self.inner.rcu(|r| {
            let mut r = Revoked::clone(r);
            r.fingerprints.remove(sha256);
            r
        });
    }

    /// Undo a revocation by serial.
    pub fn reinstate_serial(&self, serial: &[u8]) {
        let serial = normalize_serial(serial);
        self.inner.rcu(|r| {
            let mut r = Revoked::clone(r);
            r.serials.remove(&serial);
            r
        });
    }

    /// Replace the whole set at once, e.g. after syncing from a database.
    pub fn replace(
        &self,
        fingerprints: impl IntoIterator<Item = [u8; 32]>,
        serials: impl IntoIterator<Item = Vec<u8>>,
    ) {
        self.inner.store(Arc::new(Revoked {
            fingerprints: fingerprints.into_iter().collect(),
            serials: serials.into_iter().map(|s| normalize_serial(&s)).collect(),
        }));
    }

    /// Entries in the set (fingerprints plus serials).
    pub fn len(&self) -> usize {
        let r = self.inner.load();
        r.fingerprints.len() + r.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this DER certificate is revoked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        let r = self.inner.load();
        if r.fingerprints.is_empty() && r.serials.is_empty() {
            return false;
        }
        if r.fingerprints.contains(&sha256(cert_der)) {
            return true;
        }
        if r.serials.is_empty() {
            return false;
        }
        match x509::parse_cert(cert_der) {
            Some(cert) => {
                let (negative, magnitude) = serial_magnitude(cert.serial);
                !negative && r.serials.contains(&magnitude)
            }
            None => false,
        }
    }

    /// The post-handshake check for a connection's client certificate
    /// (`ServerConnection::peer_certificates()`), resumed or not. No
    /// certificate is never revoked.
    pub fn check_peer(&self, peer: Option<&[CertificateDer<'_>]>) -> Result<(), rustls::Error> {
        match peer.and_then(|chain| chain.first()) {
            Some(cert) if self.is_revoked(cert) => Err(revoked()),
            _ => Ok(()),
        }
    }
}

fn revoked() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Revoked)
}

fn normalize_serial(serial: &[u8]) -> Vec<u8> {
    let first = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    serial[first..].to_vec()
}

fn parse_hex(text: &str) -> Result<Vec<u8>, TlsError> {
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
    let bad = || TlsError::Config(format!("`{text}` is not hex"));
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err(bad());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
            Ok((hi * 16 + lo) as u8)
        })
        .collect()
}

/// A client-certificate verifier that runs `inner` and then rejects
/// revoked certificates with `CertificateError::Revoked`.
#[derive(Debug)]
pub struct RevocationVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    list: RevocationList,
}

impl RevocationVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, list: RevocationList) -> Arc<Self> {
        Arc::new(RevocationVerifier { inner, list })
    }
}

impl ClientCertVerifier for RevocationVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain first: an untrusted certificate is reported as untrusted.
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.list.is_revoked(end_entity) {
            return Err(revoked());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testutil::Pki;

    #[test]
    fn revoke_by_fingerprint_and_serial() {
        let pki = Pki::new("Revocation CA");
        let a = pki.leaf_with_serial("device-a", &[], true, Some(0x80_01));
        let b = pki.leaf_with_serial("device-b", &[], true, Some(0x42));
        let list = RevocationList::new();
        let copy = list.clone();
        assert!(list.is_empty());
        assert!(!list.is_revoked(&a.cert));

        copy.revoke_fingerprint(sha256(&a.cert));
        assert!(list.is_revoked(&a.cert), "clones share the set");
        assert!(!list.is_revoked(&b.cert));
        list.reinstate_fingerprint(&sha256(&a.cert));
        assert!(!list.is_revoked(&a.cert));

        // 0x8001 is encoded with a sign byte (00 80 01); hex forms with
        // colons and leading zeros name the same serial.
        list.revoke_serial_hex("00:80:01").unwrap();
        assert!(list.is_revoked(&a.cert));
        list.reinstate_serial(&[0x80, 0x01]);
        assert!(!list.is_revoked(&a.cert));

        list.revoke_fingerprint_hex(
            &crate::tls::forward::sha256_fingerprint(&b.cert).to_uppercase(),
        )
        .unwrap();
        assert!(list.is_revoked(&b.cert));
        assert!(list.revoke_fingerprint_hex("abcd").is_err());
        assert!(list.revoke_serial_hex("xyz").is_err());

        list.replace([], [vec![0x00, 0x42]]);
        assert_eq!(list.len(), 1);
        assert!(list.is_revoked(&b.cert));
        assert!(!list.is_revoked(&a.cert));

        assert!(list.check_peer(None).is_ok());
        assert!(list.check_peer(Some(std::slice::from_ref(&a.cert))).is_ok());
        assert_eq!(
            list.check_peer(Some(std::slice::from_ref(&b.cert))),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        );
        assert!(!list.is_revoked(b"not a certificate"));
    }
}
